//! `--weights-io`: a model gives bit-identical images whether its tensors are lent from the
//! mapped files or copied into memory, on f32 files and on fp16 files held in f16; and a
//! pipeline keeps working after its files are deleted (the mapping holds them) and unmaps
//! them when dropped. (Its own test binary: the choice is process-wide.)

mod common;

use candle_core::{DType, Device};
use common::{lighthouse, tiny_sd1_copy};
use jhakaas_model_manager::mapped::mapped_files;
use jhakaas_model_manager::weights::{set_weights_io, WeightsIo};
use jhakaas_model_manager::{ModelSource, StableDiffusionPipeline};
use std::path::Path;
use std::sync::Mutex;

/// Serialises the tests: the choice they set is process-wide.
static CHOICE: Mutex<()> = Mutex::new(());

fn load(dir: &Path, io: WeightsIo) -> StableDiffusionPipeline {
    set_weights_io(io);
    StableDiffusionPipeline::load(&ModelSource::Local(dir.to_path_buf()), &Device::Cpu).unwrap()
}

fn image(p: &StableDiffusionPipeline) -> Vec<u8> {
    lighthouse(p).into_raw()
}

#[test]
fn mapped_and_copied_weights_give_the_same_image() {
    let _choice = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    for (tag, dtype) in [("f32", DType::F32), ("f16", DType::F16)] {
        let dir = tiny_sd1_copy(tag, dtype);
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
    let dir = tiny_sd1_copy("deleted", DType::F32);
    let p = load(&dir, WeightsIo::Map);
    let before = image(&p);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(image(&p) == before);
    // Dropping the model unmaps its files.
    assert!(mapped_files() > 0);
    drop(p);
    assert_eq!(mapped_files(), 0);
}
