#!/usr/bin/env bash
# Builds the CUDA release binaries of jhakaas-worker on a machine WITHOUT a GPU, for carrying to
# a lent GPU machine that has no Rust toolchain (see run-gpu-check.sh). The toolchain (NVIDIA's
# CUDA 13.0 compiler and the pinned runtime libraries from PyPI, a stub libcuda for linking) is
# base-image/cuda-toolchain.sh's, the same the CUDA worker image is built with.
# Usage: benches/gpu/build-cuda-binary.sh [FEATURES] [COMPUTE_CAP]  -> .gpu/*.xz (the worker, the
# benchmark binaries and the kernel test binary) and .gpu/torch_cuda_ours.safetensors (our
# torch-cuda draws, which run-gpu-kernels.sh compares with torch's on the GPU)
set -euo pipefail
features="${1:-cuda}"
export CUDA_COMPUTE_CAP="${2:-90}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=base-image/cuda-toolchain.sh source-path=SCRIPTDIR/../..
source "$root/base-image/cuda-toolchain.sh"
case "$features" in *cudnn*) cuda_toolchain_setup cudnn ;; *) cuda_toolchain_setup "" ;; esac
cuda_cargo build --release --locked -p jhakaas-worker --features "$features"
# The comparison's in-process side (its engine dependency gets the same CUDA features).
cuda_cargo build --release --locked -p jhakaas-benches --bin jhakaas-bench-engine --bin jhakaas-load \
  --bin jhakaas-profile --features "jhakaas-model-manager/$features"
# The kernel tests (CUDA kernels vs their references), run there by run-gpu-kernels.sh.
tests="$(cuda_cargo test --release --locked -p jhakaas-model-manager --test kernels --features "$features" --no-run \
  --message-format=json | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'kernels':
        print(m['executable'])")"
cd "$root"
mkdir -p .gpu
for bin in jhakaas-worker jhakaas-bench-engine jhakaas-load jhakaas-profile; do
  xz -T0 -6 -c "$cuda_target_dir/release/$bin" > ".gpu/$bin.xz"
done
xz -T0 -6 -c "$tests" > .gpu/kernels-test.xz
# Host code, host build: the draws do not depend on the CUDA features.
cargo run -q --locked -p jhakaas-model-manager --example torch_cuda_draws -- \
  benches/gpu/torch_cuda_plan.json .gpu/torch_cuda_ours.safetensors
readelf -d "$cuda_target_dir/release/jhakaas-worker" | grep NEEDED
ls -la "$cuda_target_dir/release/jhakaas-worker" .gpu/jhakaas-worker.xz
