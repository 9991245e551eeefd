// Shared by our CUDA kernels: f32 loads and stores of the storage types candle uses.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace jhakaas {
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__half* p, size_t i, float x) { p[i] = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float x) { p[i] = __float2bfloat16(x); }
}  // namespace jhakaas
