# shellcheck shell=bash
# Sourced (bash): builds CUDA binaries of this workspace on a machine WITHOUT a GPU or a CUDA
# install. The one place that sets that up, for the image recipe (base-image/build.sh --cuda)
# and for the binaries carried to a lent GPU machine (benches/gpu/build-cuda-binary.sh):
#   * NVIDIA's CUDA 13.0 compiler from PyPI (GKE's and the lent machines' driver 580 runs CUDA
#     13.0 and refuses newer PTX) and the runtime libraries pinned in cuda-runtime.txt (the
#     same files the image's CUDA layer ships), in a venv;
#   * a stub libcuda.so.1 exporting the driver API symbols cudarc declares, for the linker only
#     (the real one comes from the node's driver at run time).
# Then `cuda_cargo build --release -p jhakaas-worker --features cuda` builds with it, in its own
# target dir ($JHAKAAS_CUDA_TARGET_DIR): the link flags differ from the CPU build's, and sharing
# one dir would rebuild everything on every switch.
# Inputs: CUDA_COMPUTE_CAP (default 90), JHAKAAS_CUDA_BUILD_DIR (venv and link stubs, default
# ~/.cache/jhakaas/cuda-build), JHAKAAS_CUDA_TARGET_DIR (default $JHAKAAS_CUDA_BUILD_DIR/target).
# Needs: python3 with venv, gcc, cargo.

jhakaas_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cuda_build_dir="${JHAKAAS_CUDA_BUILD_DIR:-$HOME/.cache/jhakaas/cuda-build}"
cuda_target_dir="${JHAKAAS_CUDA_TARGET_DIR:-$cuda_build_dir/target}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# cuda_toolchain_setup [cudnn]: installs (once) the compiler, the pinned runtime libraries and,
# with `cudnn`, cuDNN 9; writes the link directory. Idempotent and quiet when done before.
cuda_toolchain_setup() {
  local with_cudnn="${1:-}"
  mkdir -p "$cuda_build_dir/link"
  if [ ! -x "$cuda_build_dir/venv/bin/pip" ]; then python3 -m venv "$cuda_build_dir/venv"; fi
  local pip=("$cuda_build_dir/venv/bin/pip" install --quiet --disable-pip-version-check)
  "${pip[@]}" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*"
  "${pip[@]}" --no-deps --require-hashes -r "$jhakaas_root/base-image/cuda-runtime.txt"
  if [ "$with_cudnn" = cudnn ]; then "${pip[@]}" nvidia-cudnn-cu13; fi
  local site
  site="$(echo "$cuda_build_dir"/venv/lib/python3*/site-packages/nvidia)"
  cuda_home="$site/cu13"
  local link="$cuda_build_dir/link" n
  for n in cublas cublasLt cudart nvrtc; do ln -sf "$cuda_home/lib/lib$n.so.13" "$link/lib$n.so"; done
  ln -sf "$cuda_home/lib/libcurand.so.10" "$link/libcurand.so"
  if [ -f "$site/cudnn/lib/libcudnn.so.9" ]; then ln -sf "$site/cudnn/lib/libcudnn.so.9" "$link/libcudnn.so"; fi
  # The driver API symbols cudarc declares, from the cudarc version in Cargo.lock.
  (cd "$jhakaas_root" && cargo fetch --locked --quiet)
  local cudarc sys
  cudarc="$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3}' "$jhakaas_root/Cargo.lock")"
  sys="$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc"/src/driver/sys -name mod.rs | tail -n 1)"
  grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$sys" | sed -E 's/^\s+fn //; s/\($//' | sort -u \
    | while read -r s; do echo "void $s(void) {}"; done > "$link/stub.c"
  gcc -shared -fPIC -o "$link/libcuda.so" "$link/stub.c" -Wl,-soname,libcuda.so.1
}

# cuda_cargo ARGS...: cargo with the CUDA compiler, the link stubs and the CUDA target dir
# (without SOURCE_DATE_EPOCH, which an image build may set: cc's build scripts watch it).
cuda_cargo() {
  (cd "$jhakaas_root" \
    && env -u SOURCE_DATE_EPOCH PATH="$cuda_home/bin:$PATH" CUDA_ROOT="$cuda_home" CUDA_PATH="$cuda_home" \
       CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP" CARGO_TARGET_DIR="$cuda_target_dir" \
       RUSTFLAGS="-L $cuda_build_dir/link" cargo "$@")
}
