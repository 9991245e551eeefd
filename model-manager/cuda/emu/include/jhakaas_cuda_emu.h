// The device side of the CPU emulation of CUDA (see ../README.md): the keywords, built-in
// variables, half types, warp intrinsics and WMMA calls that model-manager/cuda/*.cu use, so
// that g++ compiles those files unchanged. Every CUDA thread is a fiber of runtime.cpp; the
// calls that make threads meet (barriers, shuffles, WMMA) go through it.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

// ---- keywords -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `__shared__` variables are statics: blocks run one after another, so a static is one block's
// shared memory. The plain build gathers them (shared.ld) and the runtime fills them with NaN
// bytes before every block, so a read before any write shows in the result.
#define __shared__ static

namespace jhakaas_emu {

/// CUDA's `dim3`.
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

/// What the running CUDA thread sees: its index, its block's, and the launch's sizes.
struct ThreadView {
  dim3 thread, block, block_dim, grid_dim;
};

/// The running thread's view (set by the runtime at every switch).
extern ThreadView* current;

/// Stops the run with a message (a misuse of a collective, a deadlock, a bad launch).
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// `__syncthreads()` at source line `line`: waits for every live thread of the block there.
void sync_threads(int line);
/// `__syncwarp(mask)` at source line `line`: waits for the warp's lanes (the mask must name
/// every live lane).
void sync_warp(int line, unsigned mask = 0xffffffffu);
/// `__shfl_xor_sync(mask, v, lane_mask)` for 32-bit values.
uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask, int width);
/// The meeting of a warp at a WMMA call: every live lane must call it with the same
/// arguments (`what`, pointer, leading dimension, layout); checks CUDA's alignment rules.
void wmma_collective(const char* what, const void* ptr, unsigned ldm, int layout,
                     size_t elem_bytes);
/// A WMMA load: this lane brings `share` (its elements of the tile, read from memory) and
/// receives the whole `count`-element tile in `tile` once every lane has brought its own.
void wmma_load(const char* what, const void* ptr, unsigned ldm, int layout, size_t elem_bytes,
               const float* share, float* tile, int count);
/// The running thread's lane in its warp.
unsigned lane_id();

}  // namespace jhakaas_emu

#define threadIdx (::jhakaas_emu::current->thread)
#define blockIdx (::jhakaas_emu::current->block)
#define blockDim (::jhakaas_emu::current->block_dim)
#define gridDim (::jhakaas_emu::current->grid_dim)
#define warpSize 32

// A barrier is known by its source line: threads that wait at different lines have diverged.
#define __syncthreads() ::jhakaas_emu::sync_threads(__LINE__)
#define __syncwarp(...) ::jhakaas_emu::sync_warp(__LINE__, ##__VA_ARGS__)
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = ::jhakaas_emu::shfl_xor(mask, bits, lane_mask, width);
  memcpy(&v, &bits, 4);
  return v;
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  return (int)::jhakaas_emu::shfl_xor(mask, (uint32_t)v, lane_mask, width);
}

// ---- math: exact where the GPU's intrinsics approximate (__expf, rsqrtf) ----------------------
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename A, typename B>
inline auto min(A a, B b) -> typename std::common_type<A, B>::type {
  return b < a ? b : a;
}
template <typename A, typename B>
inline auto max(A a, B b) -> typename std::common_type<A, B>::type {
  return a < b ? b : a;
}

// ---- half types: 16-bit storage, round to nearest even ---------------------------------------
/// CUDA's `__half` (IEEE binary16).
struct __half {
  uint16_t bits;
};
/// CUDA's `__nv_bfloat16`.
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half(float x) {
  _Float16 f = (_Float16)x;  // libgcc's conversion rounds to nearest even
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float x) {
  if (x != x) return __nv_bfloat16{0x7fff};
  uint32_t u;
  memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}

namespace jhakaas_emu {
inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace jhakaas_emu

// ---- WMMA (nvcuda::wmma): warp collectives. A lane reads and writes memory only for its share ---
// ---- of a tile (every 32nd element, the same share for a load and a store, as an accumulator ----
// ---- fragment's lanes own fixed elements on the GPU); the runtime hands every lane the whole ----
// ---- tile, and each lane computes the products itself. ------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

/// A WMMA fragment. Values are kept in f32 (exact for f16/bf16 inputs).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  float v[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& x : f.v) x = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators load with a layout");
  constexpr bool col = std::is_same<Layout, col_major>::value;
  using F = fragment<Use, M, N, K, T, Layout>;
  float share[F::rows * F::cols];
  for (int e = (int)::jhakaas_emu::lane_id(); e < F::rows * F::cols; e += 32) {
    const int r = e / F::cols, c = e % F::cols;
    share[e] = ::jhakaas_emu::widen(col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]);
  }
  ::jhakaas_emu::wmma_load("load_matrix_sync", p, ldm, col, sizeof(T), share, f.v,
                           F::rows * F::cols);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  const bool col = layout == mem_col_major;
  float share[M * N];
  for (int e = (int)::jhakaas_emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    share[e] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
  }
  ::jhakaas_emu::wmma_load("load_matrix_sync", p, ldm, col, sizeof(float), share, f.v, M * N);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  const bool col = layout == mem_col_major;
  ::jhakaas_emu::wmma_collective("store_matrix_sync", p, ldm, col, sizeof(float));
  for (int e = (int)::jhakaas_emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    p[col ? (size_t)c * ldm + r : (size_t)r * ldm + c] = f.v[e];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  ::jhakaas_emu::wmma_collective("mma_sync", nullptr, 0, 0, 0);
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i * N + j];
      for (int k = 0; k < K; ++k) s += a.v[i * K + k] * b.v[k * N + j];
      out[i * N + j] = s;
    }
  memcpy(d.v, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda

// ---- kernel registry: the harness launches kernels by name with cuLaunchKernel's packing -------
namespace jhakaas_emu {

/// What a kernel parameter is, for checking a launch's arguments against the signature.
struct ParamType {
  char kind;           // 'p' pointer, 'i' integer, 'f' floating point
  size_t bytes;        // the parameter's size
  size_t pointee;      // for pointers, the element size (0 otherwise)
};

/// One `extern "C" __global__` function as the harness finds it.
struct Kernel {
  const char* name;
  void* fn;
  void (*invoke)(void* fn, void** params);
  const ParamType* params;
  size_t arity;
};

void register_kernel(const Kernel& k);

template <typename P>
constexpr ParamType param_type() {
  using T = typename std::remove_cv<P>::type;
  return std::is_pointer<T>::value
             ? ParamType{'p', sizeof(T), sizeof(typename std::remove_pointer<T>::type)}
             : ParamType{std::is_floating_point<T>::value ? 'f' : 'i', sizeof(T), 0};
}

template <typename... A>
struct Registration {
  static constexpr ParamType types[sizeof...(A) + 1] = {param_type<A>()..., ParamType{0, 0, 0}};
  template <size_t... I>
  static void call(void* fn, void** params, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<typename std::remove_cv<A>::type*>(params[I])...);
  }
  static void invoke(void* fn, void** params) {
    call(fn, params, std::index_sequence_for<A...>{});
  }
  Registration(const char* name, void (*f)(A...)) {
    register_kernel(Kernel{name, reinterpret_cast<void*>(f), &invoke, types, sizeof...(A)});
  }
};

}  // namespace jhakaas_emu

/// Registers `extern "C"` kernel `fn` (the build appends one line per kernel to each .cu).
#define JHAKAAS_EMU_KERNEL(fn) static ::jhakaas_emu::Registration emu_registration_##fn(#fn, fn);
