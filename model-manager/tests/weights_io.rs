//! `--weights-io`: a model gives bit-identical images whether its tensors are lent from the
//! mapped files or copied into memory, on f32 files and on fp16 files held in f16; and a
//! pipeline keeps working after its files are deleted (the mapping holds them) and unmaps
//! them when dropped. (Its own test
//! binary: the choice is process-wide.)

use candle_core::{DType, Device};
use jhakaas_model_manager::mapped::mapped_files;
use jhakaas_model_manager::weights::{set_weights_io, WeightsIo};
use jhakaas_model_manager::{GenerateParams, ModelSource, SchedulerKind, StableDiffusionPipeline};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Serialises the tests: the choice they set is process-wide.
static CHOICE: Mutex<()> = Mutex::new(());

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd1-tiny")
}

/// A copy of `src` in a fresh temp folder, each f32 tensor stored as `dtype`.
fn copy_as(src: &Path, dst: &Path, dtype: DType) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_as(&path, &to, dtype);
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let tensors: std::collections::HashMap<String, candle_core::Tensor> = tensors
                .into_iter()
                .map(|(k, t)| match t.dtype() {
                    DType::F32 => (k, t.to_dtype(dtype).unwrap()),
                    _ => (k, t),
                })
                .collect();
            candle_core::safetensors::save(&tensors, &to).unwrap();
        } else {
            std::fs::copy(&path, &to).unwrap();
        }
    }
}

fn temp_copy(tag: &str, dtype: DType) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("jhakaas-io-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_as(&fixture(), &dst, dtype);
    dst
}

fn load(dir: &Path, io: WeightsIo) -> StableDiffusionPipeline {
    set_weights_io(io);
    StableDiffusionPipeline::load(&ModelSource::Local(dir.to_path_buf()), &Device::Cpu).unwrap()
}

fn image(p: &StableDiffusionPipeline) -> Vec<u8> {
    let params = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("fog".into()),
        steps: Some(3),
        seed: Some(7),
        num_images: 1,
        scheduler: Some(SchedulerKind::Ddim),
        ..Default::default()
    };
    let mut out = p
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    out.images.remove(0).image.into_raw()
}

#[test]
fn mapped_and_copied_weights_give_the_same_image() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    for (tag, dtype) in [("f32", DType::F32), ("f16", DType::F16)] {
        let dir = temp_copy(tag, dtype);
        let copied = image(&load(&dir, WeightsIo::Read));
        let mapped = image(&load(&dir, WeightsIo::Map));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(copied == mapped, "{tag} files: images differ");
    }
    set_weights_io(WeightsIo::Map);
}

#[test]
fn a_mapped_model_works_after_its_files_are_deleted_and_unmaps_them_when_dropped() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_copy("deleted", DType::F32);
    let p = load(&dir, WeightsIo::Map);
    let before = image(&p);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(image(&p) == before);
    // Dropping the model unmaps its files.
    assert!(mapped_files() > 0);
    drop(p);
    assert_eq!(mapped_files(), 0);
}
