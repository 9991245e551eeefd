// GroupNorm (+ optional SiLU) over contiguous [B, C, spatial], f32 statistics whatever the
// storage type. Two launches: `gn_stats` splits every group over `chunks` blocks and writes
// partial sums of (x - pivot) and (x - pivot)^2 (the pivot, the group's first value, keeps the
// one-pass variance accurate); `gn_apply` folds the partials of its group, then normalises,
// applies gamma/beta and SiLU. Reference: candle-nn's GroupNorm followed by silu.
#include "common.cuh"

namespace {

using jhakaas::load;
using jhakaas::store;

// Sum of `x` over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  const int warps = blockDim.x / 32;
  // Only warp 0 reads the per-warp sums: another warp's read of shared[0] would race with
  // thread 0's write below (no barrier between them).
  if (warp == 0) {
    x = lane < warps ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  }
  if (threadIdx.x == 0) shared[0] = x;
  __syncthreads();
  x = shared[0];
  return x;
}

template <typename T>
__device__ void gn_stats(const T* x, float* partial, size_t group_len, int chunks) {
  __shared__ float shared[32];
  const int group = blockIdx.y, chunk = blockIdx.x;
  const T* g = x + (size_t)group * group_len;
  const float pivot = load(g, 0);
  const size_t per_chunk = (group_len + chunks - 1) / chunks;
  const size_t start = (size_t)chunk * per_chunk;
  const size_t end = min(group_len, start + per_chunk);
  float s = 0.f, sq = 0.f;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float d = load(g, i) - pivot;
    s += d;
    sq += d * d;
  }
  s = block_sum(s, shared);
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) {
    partial[((size_t)group * chunks + chunk) * 2] = s;
    partial[((size_t)group * chunks + chunk) * 2 + 1] = sq;
  }
}

template <typename T>
__device__ void gn_apply(const T* x, const T* gamma, const T* beta, const float* partial, T* out,
                         size_t group_len, int chunks, int groups, int per_group, size_t spatial,
                         float eps, int silu) {
  __shared__ float stats[2];
  const int group = blockIdx.y, chunk = blockIdx.x;
  const T* g = x + (size_t)group * group_len;
  if (threadIdx.x == 0) {
    float s = 0.f, sq = 0.f;
    for (int c = 0; c < chunks; ++c) {
      s += partial[((size_t)group * chunks + c) * 2];
      sq += partial[((size_t)group * chunks + c) * 2 + 1];
    }
    const float n = (float)group_len;
    const float mean_shift = s / n;
    const float var = fmaxf(sq / n - mean_shift * mean_shift, 0.f);
    stats[0] = load(g, 0) + mean_shift;
    stats[1] = rsqrtf(var + eps);
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const int first_channel = (group % groups) * per_group;
  const size_t per_chunk = (group_len + chunks - 1) / chunks;
  const size_t start = (size_t)chunk * per_chunk;
  const size_t end = min(group_len, start + per_chunk);
  T* o = out + (size_t)group * group_len;
  for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int c = first_channel + (int)(i / spatial);
    float y = (load(g, i) - mean) * rstd * load(gamma, c) + load(beta, c);
    if (silu) y = y / (1.f + __expf(-y));
    store(o, i, y);
  }
}

}  // namespace

#define GROUP_NORM(SUFFIX, T)                                                                    \
  extern "C" __global__ void gn_stats_##SUFFIX(const T* x, float* partial, size_t group_len,     \
                                               int chunks) {                                     \
    gn_stats<T>(x, partial, group_len, chunks);                                                  \
  }                                                                                              \
  extern "C" __global__ void gn_apply_##SUFFIX(const T* x, const T* gamma, const T* beta,        \
                                               const float* partial, T* out, size_t group_len,   \
                                               int chunks, int groups, int per_group,            \
                                               size_t spatial, float eps, int silu) {            \
    gn_apply<T>(x, gamma, beta, partial, out, group_len, chunks, groups, per_group, spatial,     \
                eps, silu);                                                                      \
  }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
