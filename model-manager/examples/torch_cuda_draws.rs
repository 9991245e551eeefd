//! Writes our `torch-cuda` draws for the plan in `benches/gpu/torch_cuda_plan.json`, for the GPU
//! check to compare with torch's own (`benches/gpu/torch_cuda_randn.py`; there is no Rust on the
//! GPU machine, so `build-cuda-binary.sh` runs this here and carries the file).
//!
//! Usage: `cargo run --release -p jhakaas-model-manager --example torch_cuda_draws -- PLAN OUT`
//! → `OUT` (safetensors, float32 tensors `s{SEED}_d{K}`: the K-th draw of SEED's sequence).

use std::collections::BTreeMap;

use jhakaas_model_manager::noise::{CudaGrid, TorchCudaGenerator};
use safetensors::{tensor::TensorView, Dtype};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [plan, out] = args.as_slice() else {
        return Err("usage: torch_cuda_draws PLAN OUT".into());
    };
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(plan)?)?;
    let seeds = plan["seeds"].as_object().ok_or("plan: no `seeds` object")?;
    let mut draws: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (seed, sizes) in seeds {
        let mut g = TorchCudaGenerator::new(seed.parse()?, CudaGrid::H100);
        let sizes = sizes.as_array().ok_or("plan: sizes must be a list")?;
        for (k, n) in sizes.iter().enumerate() {
            let n = n.as_u64().ok_or("plan: a size must be a number")? as usize;
            let bytes = g.randn(n).iter().flat_map(|v| v.to_le_bytes()).collect();
            draws.insert(format!("s{seed}_d{k}"), bytes);
        }
    }
    let views = draws
        .iter()
        .map(|(name, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, vec![bytes.len() / 4], bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, std::path::Path::new(out))?;
    println!("wrote {} draws to {out}", draws.len());
    Ok(())
}
