//! Unit tests of the weights loader: tables left in the file, tensors lent from the mapping,
//! files refused.

use super::*;

/// A file with a token table (as the CLIP key spells it) and a plain matrix, in `dtype`.
fn table_file(dtype: DType) -> (PathBuf, Tensor) {
    let table = Tensor::arange(0f32, 40., &Device::Cpu)
        .unwrap()
        .affine(0.37, -3.0)
        .unwrap()
        .reshape((10, 4))
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let tensors = HashMap::from([
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            table.clone(),
        ),
        ("text_model.other.weight".to_string(), table.clone()),
    ]);
    // One file per call: tests run in parallel and each removes its own.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "jhakaas-table-{dtype:?}-{}-{call}.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (path, table)
}

fn open(path: &Path) -> LoadedWeights {
    let source = ModelSource::Local(path.parent().unwrap().to_path_buf());
    let stem = path.file_stem().unwrap().to_str().unwrap();
    load(&source, "", stem, DType::F32, &Device::Cpu).unwrap()
}

/// Where a CPU tensor's values are.
fn address(t: &Tensor) -> usize {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        panic!("a CPU tensor")
    };
    match s {
        candle_core::CpuStorage::F32(v) => v[layout.start_offset()..].as_ptr() as usize,
        candle_core::CpuStorage::F16(v) => v[layout.start_offset()..].as_ptr() as usize,
        _ => panic!("an f32 or f16 tensor"),
    }
}

#[test]
fn a_tensor_held_as_stored_is_lent_from_the_file_once_and_outlives_it() {
    let (path, table) = table_file(DType::F32);
    let w = open(&path);
    let name = "text_model.other.weight";
    let first = w.vb.get((10, 4), name).unwrap();
    let second = w.vb.get((10, 4), name).unwrap();
    if weights_io() == WeightsIo::Map {
        assert!(
            crate::mapped::is_mapped(address(&first)),
            "lent from the file"
        );
    }
    // A second read of the same tensor is a copy: no two buffers share pages.
    assert!(!crate::mapped::is_mapped(address(&second)));
    drop(w);
    std::fs::remove_file(&path).unwrap();
    let want = table.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for t in [&first, &second] {
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
    // Computing on a lent tensor and dropping it leave the other intact.
    let doubled = (&first * 2.0).unwrap();
    drop(first);
    assert_eq!(
        doubled.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
}

#[test]
fn a_widened_f16_tensor_is_a_copy_with_the_stored_values() {
    let (path, table) = table_file(DType::F16);
    let w = open(&path);
    let t = w.vb.get((10, 4), "text_model.other.weight").unwrap();
    assert_eq!(t.dtype(), DType::F32);
    assert!(!crate::mapped::is_mapped(address(&t)));
    let want = table.to_dtype(DType::F32).unwrap();
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_file_whose_tensors_overlap_is_refused_naming_them() {
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    let path = std::env::temp_dir().join(format!(
        "jhakaas-overlap-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, bytes).unwrap();
    let err = SafetensorsFile::open(&path).err().expect("refused");
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("`a` and `b` overlap"), "{err}");
}

#[test]
fn a_token_table_left_in_the_file_gathers_the_rows_the_tensor_holds() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (path, table) = table_file(dtype);
        let w = open(&path);
        let rows = w
            .file_rows("text_model.embeddings.token_embedding.weight")
            .expect("a token table on the CPU stays in the file");
        assert!(w.file_rows("text_model.other.weight").is_none());
        let ids = [3u32, 0, 9, 3];
        let want = table
            .to_dtype(DType::F32)
            .unwrap()
            .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(rows.gather(&ids).unwrap(), want, "{dtype:?}");
        let err = rows.gather(&[10]).unwrap_err().to_string();
        assert!(err.contains("row 10 is outside its 10 rows"), "{err}");
        // Only the other tensor is counted: the table never enters memory.
        let mut other = SafetensorsFile::open(&path).unwrap();
        other
            .entries
            .remove("text_model.embeddings.token_embedding.weight");
        assert_eq!(w.bytes, other.loaded_bytes(DType::F32, &Device::Cpu));
        assert!(w.bytes > 0);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn a_token_table_merged_with_a_lora_is_held() {
    let (path, _) = table_file(DType::F32);
    let mut tensors = SafetensorsFile::open(&path).unwrap();
    let name = "text_model.embeddings.token_embedding.weight";
    tensors.lora.insert(name.to_string(), Vec::new());
    let e = &tensors.entries[name];
    assert!(!stays_in_file(name, e, &tensors.lora, &Device::Cpu));
    assert!(stays_in_file(name, e, &HashMap::new(), &Device::Cpu));
    assert_eq!(tensors.loaded_bytes(DType::F32, &Device::Cpu), 2 * 40 * 4);
    std::fs::remove_file(&path).unwrap();
}
