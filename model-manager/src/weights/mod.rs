//! A component's safetensors weights, tensor by tensor: on the CPU a tensor held exactly as
//! stored lies in the file's mapped pages ([`crate::mapped`], [`WeightsIo::Map`]); any other
//! (converted, transposed, merged with a LoRA, or with `--weights-io read`) is read straight
//! from the file into the buffer the model keeps. Either way the loaded weights are one copy
//! in memory. Also the bytes they take once loaded in the working dtype (what the model cache
//! budgets with).

use crate::error::{Error, Result};
use crate::kernels::cpu::{uninit_vec, Plain};
use crate::source::ModelSource;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// How weights files are read on the CPU (the CLI's `--weights-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsIo {
    /// Tensors held as stored lie in the file's mapped pages (the default): a load copies
    /// and faults in nothing for them, and the page cache holds the only copy.
    #[default]
    Map,
    /// Every tensor is copied into memory (for filesystems where mapped reads are slow).
    Read,
}

impl std::str::FromStr for WeightsIo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "map" => Ok(Self::Map),
            "read" => Ok(Self::Read),
            other => Err(Error::invalid(
                "weights-io",
                format!("`{other}` is not one of map, read"),
            )),
        }
    }
}

/// Whether [`WeightsIo::Read`] is chosen.
static READ_ONLY: AtomicBool = AtomicBool::new(false);

/// Sets how weights files are read, process-wide; files opened afterwards follow it.
pub fn set_weights_io(choice: WeightsIo) {
    READ_ONLY.store(choice == WeightsIo::Read, Ordering::Relaxed);
}

/// The process-wide [`WeightsIo`].
pub fn weights_io() -> WeightsIo {
    if READ_ONLY.load(Ordering::Relaxed) {
        WeightsIo::Read
    } else {
        WeightsIo::Map
    }
}

/// How long a CPU pipeline keeps the pages of its mapped weights in its resident set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightResidency {
    /// From load on (the server's default: no job pays to fault them back in).
    #[default]
    Resident,
    /// Only while a stage that uses them runs: the text encoders while encoding the prompt,
    /// the UNet and ControlNets while denoising, the VAE while encoding or decoding. Between
    /// stages their pages are dropped from the process ([`crate::mapped::WeightPages`]) and stay
    /// in the page cache, so the peak resident set is the largest stage's rather than the
    /// whole pipeline's, for the minor faults that map them back in. The one-shot CLI's
    /// default. Weights copied at load (transposed, converted, merged) stay resident either way.
    Stage,
}

impl std::str::FromStr for WeightResidency {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "resident" => Ok(Self::Resident),
            "stage" => Ok(Self::Stage),
            other => Err(Error::invalid(
                "weights-residency",
                format!("`{other}` is not one of resident, stage"),
            )),
        }
    }
}

/// A component's weights, ready to build a model from.
pub struct LoadedWeights {
    /// Tensors, converted to the requested dtype on the requested device when used.
    pub vb: VarBuilder<'static>,
    /// The file name as errors show it (`unet/diffusion_pytorch_model.safetensors`).
    pub file: String,
    /// Bytes the floating-point tensors take in the requested dtype.
    pub bytes: u64,
    tensors: Arc<SafetensorsFile>,
}

impl LoadedWeights {
    /// The mapped file the model's weights lie in, for dropping their resident pages between
    /// uses ([`WeightResidency::Stage`]); empty where nothing was mapped.
    pub fn pages(&self) -> crate::mapped::WeightPages {
        let mapped = self.tensors.mapped.get().and_then(|m| m.clone());
        crate::mapped::WeightPages::new(mapped.into_iter().collect())
    }

    /// The lookup table `name` as rows gathered from the file, where [`stays_in_file`] says
    /// so; otherwise the model holds it (read through `vb`).
    pub fn file_rows(&self, name: &str) -> Option<FileRows> {
        let e = self.tensors.entries.get(name)?;
        stays_in_file(name, e, &self.tensors.lora, self.vb.device()).then(|| FileRows {
            file: self.tensors.file.clone(),
            name: name.to_string(),
            start: e.start,
            rows: e.shape[0],
            cols: e.shape[1],
            dtype: e.dtype,
        })
    }
}

/// Whether tensor `name` is left in the file rather than held: on the CPU, a lookup table a
/// request gathers a few rows of (CLIP's token embeddings: 49408 rows of which a prompt reads
/// 77) is read row by row from the page cache, so its 0.15 GB (SD 1.5) never enter the
/// process's memory. The one rule: the byte accounting and [`LoadedWeights::file_rows`] ask it.
fn stays_in_file(
    name: &str,
    e: &Entry,
    lora: &HashMap<String, Vec<crate::lora::Delta>>,
    device: &Device,
) -> bool {
    device.is_cpu()
        && name.ends_with("embeddings.token_embedding.weight")
        && e.shape.len() == 2
        && matches!(e.dtype, DType::F32 | DType::F16 | DType::BF16)
        && !lora.contains_key(name)
}

/// Rows of a 2-D table in a safetensors file, gathered on demand (see [`stays_in_file`]).
/// The open file keeps the bytes reachable even if the path is replaced.
#[derive(Debug, Clone)]
pub struct FileRows {
    file: Arc<std::fs::File>,
    name: String,
    start: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
}

impl FileRows {
    /// Rows in the table.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `ids`, widened to f32 (exactly), one after another: `ids.len() × cols` values.
    pub fn gather(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let width = self.dtype.size_in_bytes();
        let row_bytes = self.cols * width;
        let mut bytes = vec![0u8; row_bytes];
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            if id as usize >= self.rows {
                return Err(candle_core::Error::Msg(format!(
                    "`{}`: row {id} is outside its {} rows",
                    self.name, self.rows
                )));
            }
            let at = self.start + (id as usize * row_bytes) as u64;
            self.file.read_exact_at(&mut bytes, at).map_err(|err| {
                candle_core::Error::Msg(format!("reading `{}` row {id}: {err}", self.name))
            })?;
            let values = bytes.chunks_exact(width);
            match self.dtype {
                DType::F32 => {
                    out.extend(values.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                }
                DType::F16 => {
                    out.extend(values.map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
                }
                _ => out.extend(values.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            }
        }
        Ok(out)
    }
}

/// Relative path of `stem.safetensors` in `folder` (`""` = the repository root).
fn in_folder(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{folder}/{name}")
    }
}

/// Opens `folder/stem.safetensors` (or its `.fp16` variant) of `source`.
pub fn load(
    source: &ModelSource,
    folder: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<LoadedWeights> {
    load_merged(source, folder, stem, dtype, device, None)
}

/// Opens `folder/stem.safetensors` of `source`, the weights `lora` names merged with their
/// LoRA updates as they are read.
pub fn load_merged(
    source: &ModelSource,
    folder: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
    lora: Option<&HashMap<String, Vec<crate::lora::Delta>>>,
) -> Result<LoadedWeights> {
    let (plain, path) = locate(source, folder, stem)?;
    let config_error = |reason: String| Error::Config {
        file: plain.clone(),
        reason,
    };
    let mut tensors = SafetensorsFile::open(&path).map_err(config_error)?;
    tensors.lora = lora.cloned().unwrap_or_default();
    let bytes = tensors.loaded_bytes(dtype, device);
    let tensors = Arc::new(tensors);
    let backend = Box::new(Backend(tensors.clone()));
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    Ok(LoadedWeights {
        vb,
        file: plain,
        bytes,
        tensors,
    })
}

/// The file name errors show and the path of `folder/stem.safetensors` (or `.fp16`).
fn locate(source: &ModelSource, folder: &str, stem: &str) -> Result<(String, PathBuf)> {
    let plain = in_folder(folder, &format!("{stem}.safetensors"));
    let fp16 = in_folder(folder, &format!("{stem}.fp16.safetensors"));
    let path = source.first_of(&[&plain, &fp16])?;
    Ok((plain, path))
}

/// The name and shape of every tensor of `folder/stem.safetensors`, from its header alone.
pub fn tensor_shapes(
    source: &ModelSource,
    folder: &str,
    stem: &str,
) -> Result<HashMap<String, Vec<usize>>> {
    let (plain, path) = locate(source, folder, stem)?;
    file_tensor_shapes(&path).map_err(|reason| Error::Config {
        file: plain,
        reason,
    })
}

/// The name and shape of every tensor of the safetensors file at `path`, from its header.
pub fn file_tensor_shapes(path: &Path) -> std::result::Result<HashMap<String, Vec<usize>>, String> {
    Ok(SafetensorsFile::open(path)?
        .entries
        .into_iter()
        .map(|(name, e)| (name, e.shape))
        .collect())
}

/// Turns a shape mismatch while building a model into a config error naming `file`.
pub fn with_file<T>(file: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Candle(c) => Error::Config {
            file: file.to_string(),
            reason: format!("weights do not match the config: {c}"),
        },
        other => other,
    })
}

/// Bytes of the floating-point tensors of a safetensors file once loaded in `dtype` on
/// `device` (weights held in f16 counted so, [`SafetensorsFile::loaded_bytes`]), read from its
/// header alone.
pub fn loaded_bytes(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> std::result::Result<u64, String> {
    Ok(SafetensorsFile::open(path)?.loaded_bytes(dtype, device))
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// An open safetensors file and its parsed header: tensors are read on request.
struct SafetensorsFile {
    file: Arc<std::fs::File>,
    entries: HashMap<String, Entry>,
    /// LoRA updates merged into these weights as they are read.
    lora: HashMap<String, Vec<crate::lora::Delta>>,
    /// The file mapped on the first read that can use it (`None`: read instead).
    mapped: OnceLock<Option<Arc<crate::mapped::MappedFile>>>,
    /// Where the tensors lent out of the mapping start: each is lent at most once, so no two
    /// buffers share pages (a later read of the same tensor copies).
    lent: Mutex<std::collections::HashSet<u64>>,
}

/// The safetensors dtypes candle holds (others are skipped; a model asking for one fails).
fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Reads and checks the header: every tensor's bytes lie inside the file and match its
    /// shape and dtype.
    fn open(path: &Path) -> std::result::Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let file_len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| "shorter than a safetensors header".to_string())?;
        let header_len = u64::from_le_bytes(n);
        if header_len > 100 << 20 || 8 + header_len > file_len {
            return Err(format!("implausible header length {header_len}"));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| e.to_string())?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        for (name, t) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
            let bad = |what: &str| format!("tensor `{name}`: {what}");
            let dtype_name = t
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad("no dtype"))?;
            let Some(dtype) = dtype_of(dtype_name) else {
                continue;
            };
            let shape: Vec<usize> = t
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| {
                    d.as_u64()
                        .map(|d| d as usize)
                        .ok_or_else(|| bad("bad shape"))
                })
                .collect::<std::result::Result<_, _>>()?;
            let offsets = t
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .filter(|o| o.len() == 2)
                .ok_or_else(|| bad("no data_offsets"))?;
            let (Some(a), Some(b)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
                return Err(bad("bad data_offsets"));
            };
            let elems: u64 = shape.iter().map(|&d| d as u64).product();
            if b < a || b - a != elems * dtype.size_in_bytes() as u64 {
                return Err(bad("data_offsets do not match its shape and dtype"));
            }
            if data_start + b > file_len {
                return Err(bad(
                    "data lies past the end of the file (truncated download?)",
                ));
            }
            entries.insert(
                name.clone(),
                Entry {
                    dtype,
                    shape,
                    start: data_start + a,
                    end: data_start + b,
                },
            );
        }
        let mut ranges: Vec<(u64, u64, &String)> =
            entries.iter().map(|(n, e)| (e.start, e.end, n)).collect();
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(format!(
                "tensors `{}` and `{}` overlap in the file",
                w[0].2, w[1].2
            ));
        }
        Ok(Self {
            file: Arc::new(file),
            entries,
            lora: HashMap::new(),
            mapped: OnceLock::new(),
            lent: Mutex::new(Default::default()),
        })
    }

    /// Bytes the floating-point tensors take once loaded in `dtype` on `device`. Where the CPU
    /// holds weights in f16 ([`crate::kernels::held::holds_f16`]), a matrix or filter (rank ≥ 2:
    /// the linear and conv weights) stored in f16 and not merged with a LoRA counts 2 bytes;
    /// a table left in the file ([`stays_in_file`]) counts nothing.
    fn loaded_bytes(&self, dtype: DType, device: &Device) -> u64 {
        let held_f16 = dtype == DType::F32 && crate::kernels::held::holds_f16(device);
        self.entries
            .iter()
            .filter(|(_, e)| e.dtype.is_float())
            .filter(|(name, e)| !stays_in_file(name, e, &self.lora, device))
            .map(|(name, e)| {
                let stays_f16 = held_f16
                    && e.dtype == DType::F16
                    && e.shape.len() >= 2
                    && !self.lora.contains_key(name);
                let width = if stays_f16 { DType::F16 } else { dtype };
                e.shape.iter().map(|&d| d as u64).product::<u64>() * width.size_in_bytes() as u64
            })
            .sum()
    }

    /// Reads tensor `name` into a fresh buffer and converts it to `dtype` on `device`, with
    /// its LoRA updates merged in f32 first.
    fn read(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if let Some(deltas) = self.lora.get(name) {
            return crate::lora::merge(self.read_base(name, device)?, deltas)?.to_dtype(dtype);
        }
        let e = self.entry(name)?;
        if e.dtype == DType::F16 && dtype == DType::F32 && device.is_cpu() {
            let v: Vec<half::f16> = self.read_vec(e, name)?;
            return if crate::kernels::held::stored_f16_wanted() {
                // A weight the CPU kernels hold in f16: kept in the buffer it was read into.
                Tensor::from_vec(v, e.shape.as_slice(), device)
            } else {
                // Widened in parallel (candle's `to_dtype` runs on one core).
                Tensor::from_vec(crate::kernels::held::widen(&v), e.shape.as_slice(), device)
            };
        }
        self.read_base(name, device)?.to_dtype(dtype)
    }

    fn entry(&self, name: &str) -> candle_core::Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
    }

    /// Reads tensor `name` as stored into a fresh buffer on `device`.
    fn read_base(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let e = self.entry(name)?;
        if e.dtype == DType::F32 && device.is_cpu() {
            // Straight into the f32 buffer the tensor keeps.
            let v: Vec<f32> = self.read_vec(e, name)?;
            return Tensor::from_vec(v, e.shape.as_slice(), device);
        }
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        self.read_at(&mut bytes, e.start, name)?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, device)
    }

    /// The values of `e` as a buffer of `T` (a float type of `e`'s width): lent out of the
    /// mapped file where [`WeightsIo::Map`] allows, otherwise read straight into a buffer.
    fn read_vec<T: Plain>(&self, e: &Entry, name: &str) -> candle_core::Result<Vec<T>> {
        let len = (e.end - e.start) as usize;
        debug_assert_eq!(std::mem::size_of::<T>(), e.dtype.size_in_bytes());
        let count = len / std::mem::size_of::<T>();
        if let Some(v) = self.lend(e, count) {
            return Ok(v);
        }
        // Every byte is written by the read below (or the buffer is dropped on error).
        let mut v = uninit_vec::<T>(count);
        // SAFETY: the u8 view covers exactly the buffer; callers pick a `Plain` `T` of the
        // stored width, for which any bytes are a valid value.
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) };
        self.read_at(bytes, e.start, name)?;
        Ok(v)
    }

    /// The `count` values of `e` over the mapped file, if it maps and `e` was not lent before.
    fn lend<T: Plain>(&self, e: &Entry, count: usize) -> Option<Vec<T>> {
        if weights_io() != WeightsIo::Map {
            return None;
        }
        let mapped = self
            .mapped
            .get_or_init(|| crate::mapped::MappedFile::map(&self.file).map(Arc::new))
            .as_ref()?;
        // Tensors never overlap (checked at open), so a start names one tensor.
        if !self
            .lent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(e.start)
        {
            return None;
        }
        mapped.lend(usize::try_from(e.start).ok()?, count)
    }

    /// Fills `buf` from byte `at` of the file; a large tensor in parallel chunks, so that
    /// every core copies (and faults in) its share of the fresh buffer.
    fn read_at(&self, buf: &mut [u8], at: u64, name: &str) -> candle_core::Result<()> {
        use rayon::prelude::*;
        const CHUNK: usize = 4 << 20;
        let error = |err: std::io::Error| {
            candle_core::Error::Msg(format!("reading tensor `{name}`: {err}"))
        };
        if buf.len() <= 2 * CHUNK {
            return self.file.read_exact_at(buf, at).map_err(error);
        }
        buf.par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| self.file.read_exact_at(chunk, at + (i * CHUNK) as u64))
            .map_err(error)
    }
}

/// The file as a [`VarBuilder`] backend, shared with [`LoadedWeights::file_rows`].
struct Backend(Arc<SafetensorsFile>);

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.read(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests;
