// GEGLU over contiguous [rows, 2n] -> [rows, n]: value * gelu_erf(gate), computed in f32.
// Reference: crate::layers::geglu_reference (chunk, gelu_erf, multiply).
#include "common.cuh"

namespace {
using jhakaas::load;
using jhakaas::store;

template <typename T>
__device__ void geglu(const T* x, T* out, size_t rows, size_t n) {
  const size_t total = rows * n;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / n, c = i % n;
    const float value = load(x, r * 2 * n + c);
    const float gate = load(x, r * 2 * n + n + c);
    store(out, i, value * 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f)));
  }
}
}  // namespace

extern "C" __global__ void geglu_f32(const float* x, float* out, size_t rows, size_t n) { geglu(x, out, rows, n); }
extern "C" __global__ void geglu_f16(const __half* x, __half* out, size_t rows, size_t n) { geglu(x, out, rows, n); }
extern "C" __global__ void geglu_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, size_t rows, size_t n) { geglu(x, out, rows, n); }
