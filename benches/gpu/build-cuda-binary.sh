#!/usr/bin/env bash
# Builds the CUDA release binary of jhakaas-worker on a machine WITHOUT a GPU, for carrying to
# a lent GPU machine that has no Rust toolchain (see run-gpu-check.sh):
#   * NVIDIA's CUDA compiler and the cuBLAS/cuRAND/NVRTC(/cuDNN) libraries from PyPI, at the
#     CUDA version of the target machine's driver (13.0 for driver 580: newer PTX is refused);
#   * a stub libcuda.so.1 exporting the driver API symbols cudarc declares, for the linker
#     only (the real one comes from the driver at run time).
# Usage: benches/gpu/build-cuda-binary.sh [FEATURES] [COMPUTE_CAP]  -> .gpu/*.xz (the worker, the
# benchmark binaries and the kernel test binary)
set -euo pipefail
features="${1:-cuda}"
cap="${2:-90}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="${JHAKAAS_GPU_BUILD_DIR:-/tmp/jhakaas-cuda-build}"
mkdir -p "$work/link"
if [ ! -x "$work/venv/bin/pip" ]; then python3 -m venv "$work/venv"; fi
pkgs=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*"
      "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand" "nvidia-cuda-nvrtc==13.0.*")
case "$features" in *cudnn*) pkgs+=("nvidia-cudnn-cu13") ;; esac
"$work/venv/bin/pip" install --quiet "${pkgs[@]}"
site="$(echo "$work"/venv/lib/python3*/site-packages/nvidia)"
cu="$site/cu13"
for n in cublas cublasLt cudart nvrtc; do ln -sf "$cu/lib/lib$n.so.13" "$work/link/lib$n.so"; done
ln -sf "$cu/lib/libcurand.so.10" "$work/link/libcurand.so"
[ -f "$site/cudnn/lib/libcudnn.so.9" ] && ln -sf "$site/cudnn/lib/libcudnn.so.9" "$work/link/libcudnn.so"
sys="$(ls "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -n 1)"
grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$sys" | sed -E 's/^\s+fn //; s/\($//' | sort -u \
  | while read -r s; do echo "void $s(void) {}"; done > "$work/link/stub.c"
gcc -shared -fPIC -o "$work/link/libcuda.so" "$work/link/stub.c" -Wl,-soname,libcuda.so.1
cd "$root"
PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="$cap" \
  CARGO_TARGET_DIR="$work/target" RUSTFLAGS="-L $work/link" \
  cargo build --release --locked -p jhakaas-worker --features "$features"
# The comparison's in-process side (its engine dependency gets the same CUDA features).
PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="$cap" \
  CARGO_TARGET_DIR="$work/target" RUSTFLAGS="-L $work/link" \
  cargo build --release --locked -p jhakaas-benches --bin jhakaas-bench-engine --bin jhakaas-load \
  --bin jhakaas-profile --features "jhakaas-model-manager/$features"
# The kernel tests (CUDA kernels vs their references), run there by run-gpu-kernels.sh.
tests="$(PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_COMPUTE_CAP="$cap" \
  CARGO_TARGET_DIR="$work/target" RUSTFLAGS="-L $work/link" \
  cargo test --release --locked -p jhakaas-model-manager --test kernels --features "$features" --no-run \
  --message-format=json | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'kernels':
        print(m['executable'])")"
mkdir -p .gpu
xz -T0 -6 -c "$work/target/release/jhakaas-worker" > .gpu/jhakaas-worker.xz
xz -T0 -6 -c "$work/target/release/jhakaas-bench-engine" > .gpu/jhakaas-bench-engine.xz
xz -T0 -6 -c "$work/target/release/jhakaas-load" > .gpu/jhakaas-load.xz
xz -T0 -6 -c "$work/target/release/jhakaas-profile" > .gpu/jhakaas-profile.xz
xz -T0 -6 -c "$tests" > .gpu/kernels-test.xz
readelf -d "$work/target/release/jhakaas-worker" | grep NEEDED
ls -la "$work/target/release/jhakaas-worker" .gpu/jhakaas-worker.xz
