// Flash attention forward for Stable Diffusion's attention layers, half precision in, half
// precision out, f32 accumulation (tensor cores through WMMA) and an online softmax in f32: the
// Lq x Lk score matrix is never stored. q: [B, Lq, H*D], k and v: [B, Lk, H*D] with contiguous
// rows (batch and row strides given, so they can be views into one fused projection); out is a
// contiguous [B, Lq, H*D]. One block handles BR query rows of one (batch, head); each warp owns 16 rows and
// walks the keys in blocks of BC, keeping its running output in shared memory (f32).
// Reference: crate::layers::attention_reference (the plain candle math).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

// The kernel needs bf16 tensor cores (compute capability 8.0+). Built for an older GPU it would
// compile to an empty body that launches and leaves the output uninitialised, so refuse loudly.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "attention.cu needs compute capability 8.0 or newer (bf16 tensor cores): build with CUDA_COMPUTE_CAP >= 80"
#endif

using namespace nvcuda;

namespace {

constexpr int BC = 32;  // keys per step

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T zero() { return from_float<T>(0.f); }

// DP: head width padded to a multiple of 16; BR: query rows per block (16 per warp).
template <typename T, int DP, int BR>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, T* __restrict__ out, long long qb_stride,
                                int q_rs, long long kb_stride, int k_rs, long long vb_stride,
                                int v_rs, int lq, int lk, int heads, int d, float scale_log2) {
#if __CUDA_ARCH__ >= 800
  constexpr int DT = DP / 16;  // 16-wide tiles along the head width
  __shared__ __align__(32) T k_s[BC * DP];
  __shared__ __align__(32) T v_s[BC * DP];
  __shared__ __align__(32) float o_s[BR * DP];  // also stages Q at the start
  __shared__ __align__(32) float s_s[BR * BC];
  __shared__ __align__(32) T p_s[BR * BC];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int row0 = blockIdx.x * BR;
  const int inner = heads * d;
  const T* qb = q + b * qb_stride + h * d;
  const T* kb = k + b * kb_stride + h * d;
  const T* vb = v + b * vb_stride + h * d;

  // Stage this block's queries (zero-padded) and keep each warp's as fragments.
  T* q_s = reinterpret_cast<T*>(o_s);
  for (int i = threadIdx.x; i < BR * DP; i += blockDim.x) {
    int r = i / DP, c = i % DP;
    q_s[i] = (row0 + r < lq && c < d) ? qb[(size_t)(row0 + r) * q_rs + c] : zero<T>();
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[DT];
#pragma unroll
  for (int t = 0; t < DT; ++t) wmma::load_matrix_sync(q_frag[t], q_s + warp * 16 * DP + t * 16, DP);
  __syncthreads();
  for (int i = threadIdx.x; i < BR * DP; i += blockDim.x) o_s[i] = 0.f;

  // Lanes 2r and 2r+1 own row r of the warp's 16: its running max and sum.
  const int my_row = lane / 2, half_sel = lane % 2;
  float row_max = -INFINITY, row_sum = 0.f;
  float* o_w = o_s + warp * 16 * DP;
  float* s_w = s_s + warp * 16 * BC;
  T* p_w = p_s + warp * 16 * BC;

  for (int j0 = 0; j0 < lk; j0 += BC) {
    __syncthreads();  // everyone is done with the previous K/V block
    for (int i = threadIdx.x; i < BC * DP; i += blockDim.x) {
      int r = i / DP, c = i % DP;
      bool ok = j0 + r < lk && c < d;
      k_s[i] = ok ? kb[(size_t)(j0 + r) * k_rs + c] : zero<T>();
      v_s[i] = ok ? vb[(size_t)(j0 + r) * v_rs + c] : zero<T>();
    }
    __syncthreads();

    // S = Q · Kᵀ for this warp's 16 rows and the block's BC keys.
#pragma unroll
    for (int n = 0; n < BC / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_s + n * 16 * DP + t * 16, DP);
        wmma::mma_sync(acc, q_frag[t], k_frag, acc);
      }
      wmma::store_matrix_sync(s_w + n * 16, acc, BC, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on this lane's half row (in log2 units).
    constexpr int HALF = BC / 2;
    float vals[HALF];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      int col = half_sel * HALF + c;
      float s = (j0 + col < lk) ? s_w[my_row * BC + col] * scale_log2 : -INFINITY;
      vals[c] = s;
      m = fmaxf(m, s);
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    const float new_max = fmaxf(row_max, m);
    const float alpha = exp2f(row_max - new_max);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      float p = exp2f(vals[c] - new_max);
      sum += p;
      p_w[my_row * BC + half_sel * HALF + c] = from_float<T>(p);
    }
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    row_sum = row_sum * alpha + sum;
    row_max = new_max;
    for (int c = half_sel; c < DP; c += 2) o_w[my_row * DP + c] *= alpha;
    __syncwarp();

    // O = P · V + O (the rescaled running output).
#pragma unroll
    for (int n = 0; n < DT; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_w + n * 16, DP, wmma::mem_row_major);
#pragma unroll
      for (int t = 0; t < BC / 16; ++t) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_w + t * 16, BC);
        wmma::load_matrix_sync(v_frag, v_s + t * 16 * DP + n * 16, DP);
        wmma::mma_sync(acc, p_frag, v_frag, acc);
      }
      wmma::store_matrix_sync(o_w + n * 16, acc, DP, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int row = row0 + warp * 16 + my_row;
  if (row < lq) {
    const float inv = 1.f / row_sum;
    T* o = out + ((size_t)b * lq + row) * inner + h * d;
    for (int c = half_sel; c < d; c += 2) o[c] = from_float<T>(o_w[my_row * DP + c] * inv);
  }
#endif
}

}  // namespace

#define FLASH(NAME, T, DP, BR)                                                                 \
  extern "C" __global__ void __launch_bounds__(BR * 2)                                         \
      NAME(const T* q, const T* k, const T* v, T* out, long long qb, int qr, long long kb,      \
           int kr, long long vb, int vr, int lq, int lk, int heads, int d, float scale_log2) {  \
    flash_attention<T, DP, BR>(q, k, v, out, qb, qr, kb, kr, vb, vr, lq, lk, heads, d,         \
                               scale_log2);                                                    \
  }

// Padded head widths: 48 (SD 1.x's 40), 64 (SD 2.x, SDXL), 80, 128, 160. 64 query rows per
// block up to 80, 32 above (shared memory stays under the 48 KiB static limit).
FLASH(flash_attn_f16_d48, __half, 48, 64)
FLASH(flash_attn_f16_d64, __half, 64, 64)
FLASH(flash_attn_f16_d80, __half, 80, 64)
FLASH(flash_attn_f16_d128, __half, 128, 32)
FLASH(flash_attn_f16_d160, __half, 160, 32)
FLASH(flash_attn_bf16_d48, __nv_bfloat16, 48, 64)
FLASH(flash_attn_bf16_d64, __nv_bfloat16, 64, 64)
FLASH(flash_attn_bf16_d80, __nv_bfloat16, 80, 64)
FLASH(flash_attn_bf16_d128, __nv_bfloat16, 128, 32)
FLASH(flash_attn_bf16_d160, __nv_bfloat16, 160, 32)
