// The CUDA built-ins that kernel bodies use, emulated on the CPU (see emu_runtime.h). Stands in
// for mlx/backend/cuda/device/utils.cuh and cooperative_groups.h.
#pragma once
#include "emu_runtime.h"
#include "emu_types.h"

struct dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
struct CudaCtx { dim3 threadIdx, blockIdx, blockDim, gridDim; };
inline CudaCtx& cuda() { return *static_cast<CudaCtx*>(self().user); }  // the running fiber's
}  // namespace emu
#define threadIdx (::emu::cuda().threadIdx)
#define blockIdx (::emu::cuda().blockIdx)
#define blockDim (::emu::cuda().blockDim)
#define gridDim (::emu::cuda().gridDim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __grid_constant__

using __half = emu::f16;
using __nv_bfloat16 = emu::bf16;
inline float __half2float(__half x) { return float(x); }
inline __half __float2half(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return float(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }

inline void __syncthreads() { emu::barrier(emu::ORDERS_THREADGROUP | emu::ORDERS_DEVICE); }

// Warp shuffles; `mask` must name exactly the lanes that exist (checked), width 32.
namespace emu {
inline void check_mask(unsigned mask) {
  unsigned w = simd_width();
  unsigned want = w == 32 ? 0xffffffffu : (1u << w) - 1u;
  if (mask != want) fail("shuffle mask names lanes that do not take part");
}
}  // namespace emu
template <class T> T __shfl_sync(unsigned mask, T v, int src) {
  emu::check_mask(mask);
  return emu::simd_exchange(v, [src](const T* x, unsigned, unsigned) { return x[src & 31]; });
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int m) {
  emu::check_mask(mask);
  return emu::simd_exchange(v, [m](const T* x, unsigned l, unsigned) { return x[(l ^ m) & 31]; });
}
template <class T> T __shfl_down_sync(unsigned mask, T v, unsigned d) {
  emu::check_mask(mask);
  return emu::simd_exchange(v, [d](const T* x, unsigned l, unsigned w) { return l + d < w ? x[l + d] : x[l]; });
}
template <class T> T __shfl_up_sync(unsigned mask, T v, unsigned d) {
  emu::check_mask(mask);
  return emu::simd_exchange(v, [d](const T* x, unsigned l, unsigned) { return l >= d ? x[l - d] : x[l]; });
}

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}

using std::exp; using std::log; using std::sqrt; using std::tanh; using std::fabs;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

namespace cooperative_groups {}
