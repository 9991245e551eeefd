//! The `torch-cpu` generator against torch itself: every draw recorded by
//! `tests/fixtures/torch_generator_reference.py` (`torch.randn(n, generator=g)` in sequence, for
//! several seeds, through torch's scalar path, its 16-wide path and its tail) must come out
//! bit for bit.

mod common;

use common::fixtures;
use jhakaas_model_manager::noise::TorchCpuGenerator;
use safetensors::SafeTensors;
use std::collections::BTreeMap;

#[test]
fn randn_matches_torch_bit_for_bit_across_draw_sizes_and_seeds() {
    let bytes = std::fs::read(fixtures().join("reference/torch_cpu_randn.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // s{SEED}_d{K} -> the K-th draw of SEED's sequence.
    let mut sequences: BTreeMap<u64, BTreeMap<usize, Vec<f32>>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if name.starts_with('h') {
            continue; // the half-precision draws, below
        }
        let (seed, k) = name[1..].split_once("_d").expect("s{SEED}_d{K}");
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        sequences
            .entry(seed.parse().unwrap())
            .or_default()
            .insert(k.parse().unwrap(), values);
    }
    assert_eq!(sequences.len(), 5, "seeds in the reference file");
    let mut checked = 0;
    for (seed, draws) in &sequences {
        let mut g = TorchCpuGenerator::new(*seed);
        for (k, expected) in draws {
            let ours = g.randn(expected.len());
            if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != expected[i].to_bits()) {
                panic!(
                    "seed {seed}, draw {k} of {} values: value {i} is {} (torch: {})",
                    expected.len(),
                    ours[i],
                    expected[i]
                );
            }
            checked += ours.len();
        }
    }
    assert!(checked > 100_000, "{checked} values checked");
}

/// Half-precision draws (a float16 pipeline's latents drawn on the CPU): torch's own layout
/// from 16 values on (whole blocks first, then a fresh tail), each value ours rounded to f16.
#[test]
fn half_precision_draws_match_torch_bit_for_bit() {
    let bytes = std::fs::read(fixtures().join("reference/torch_cpu_randn.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut sequences: BTreeMap<u64, BTreeMap<usize, Vec<u16>>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(rest) = name.strip_prefix('h') else {
            continue;
        };
        let (seed, k) = rest.split_once("_d").expect("h{SEED}_d{K}");
        let bits = view
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        sequences
            .entry(seed.parse().unwrap())
            .or_default()
            .insert(k.parse().unwrap(), bits);
    }
    assert_eq!(sequences.len(), 3, "seeds with half-precision draws");
    let mut checked = 0;
    for (seed, draws) in &sequences {
        let mut g = TorchCpuGenerator::new(*seed);
        for (k, expected) in draws {
            let ours: Vec<u16> = g
                .randn_half(expected.len())
                .into_iter()
                .map(|v| half::f16::from_f32(v).to_bits())
                .collect();
            if let Some(i) = (0..ours.len()).find(|&i| ours[i] != expected[i]) {
                panic!(
                    "seed {seed}, half draw {k} of {} values: value {i} is {:#06x} (torch: {:#06x})",
                    expected.len(),
                    ours[i],
                    expected[i]
                );
            }
            checked += ours.len();
        }
    }
    assert!(checked > 40_000, "{checked} values checked");
}
