// Stand-in for MLX's "mlx/backend/cuda/device/utils.cuh" (MLX 0.32), the header that
// mx.fast.cuda_kernel puts first in every kernel. An installed MLX has it only as a string inside
// the mlx-cuda wheel's libmlx.so, and that wheel cannot be installed next to the CPU build the
// tests run on (mlx_mamba/ops/KERNELS.md says why), so tests/test_nvrtc.py compiles against this
// file. It is written here, not copied: it includes the same CUDA headers, defines the same macros
// and declares the same names in mlx::core::cu as MLX's utils.cuh and the two headers it includes
// (complex.cuh, config.h): what can change the meaning of a kernel body. Functions are declared
// with a catch-all signature: what matters to a body is that the names exist (an unqualified call
// inside mlx::core::cu finds them before any global function of the same name).
#pragma once

#define MAX_NDIM 10
#define WARP_SIZE 32
#define LIBCUDACXX_ENABLE_SIMPLIFIED_COMPLEX_OPERATIONS

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/complex>
#include <cuda/std/limits>
#include <cuda/std/tuple>
#include <cuda/std/type_traits>

namespace mlx::core::cu {

using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

template <typename T>
using complex_t = cuda::std::complex<T>;
using complex64_t = complex_t<float>;
using complex128_t = complex_t<double>;
template <typename T>
struct is_complex;
template <typename T>
constexpr bool is_complex_v = false;

template <typename T, int N>
struct AlignedVector;
template <typename T, typename = void>
struct Limits;
template <int DIM, bool General, typename OffsetT>
struct LoopedElemToLoc;

constexpr float F8E4M3_MAX = 448.0f;
constexpr float F4E2M1_MAX = 6.0f;

#define MLX_STUB_FUNCTION(name) \
  template <typename... Args>   \
  __host__ __device__ void name(Args...)
MLX_STUB_FUNCTION(is_aligned);
MLX_STUB_FUNCTION(unsafe_load_vector);
MLX_STUB_FUNCTION(load_vector);
MLX_STUB_FUNCTION(unsafe_store_vector);
MLX_STUB_FUNCTION(store_vector);
MLX_STUB_FUNCTION(elem_to_loc);
MLX_STUB_FUNCTION(elem_to_loc_nd);
#undef MLX_STUB_FUNCTION

// MLX also defines operator% and the orderings <, <=, >, >= on complex_t<T>.
template <typename T>
__host__ __device__ complex_t<T> operator%(complex_t<T> a, complex_t<T> b);
template <typename T>
__host__ __device__ bool operator<(complex_t<T> a, complex_t<T> b);
template <typename T>
__host__ __device__ bool operator<=(complex_t<T> a, complex_t<T> b);
template <typename T>
__host__ __device__ bool operator>(complex_t<T> a, complex_t<T> b);
template <typename T>
__host__ __device__ bool operator>=(complex_t<T> a, complex_t<T> b);

} // namespace mlx::core::cu
