// The Metal built-ins that kernel bodies use, emulated on the CPU (see emu_runtime.h). Plays the
// part of MLX's Metal preamble: metal_stdlib, `using namespace metal`, float16_t, bfloat16_t.
#pragma once
#include "emu_runtime.h"
#include "emu_types.h"

namespace metal {
using uint = unsigned;
using ushort = uint16_t;
using half = emu::f16;
using bfloat = emu::bf16;
struct uint3 { unsigned x = 0, y = 0, z = 0; };

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
inline unsigned orders(mem_flags f) {  // mem_none: the threads meet, their memory is not ordered
  return (unsigned(f) & 2u ? emu::ORDERS_THREADGROUP : 0u) | (unsigned(f) & 1u ? emu::ORDERS_DEVICE : 0u);
}
inline void threadgroup_barrier(mem_flags f) { emu::barrier(orders(f)); }
inline void simdgroup_barrier(mem_flags f) { emu::simd_barrier(orders(f)); }

enum memory_order { memory_order_relaxed };
template <class T> struct atomic { T v; };
template <class T> void atomic_store_explicit(atomic<T>* p, T v, memory_order) {
  std::atomic_ref<T>(p->v).store(v, std::memory_order_relaxed);
}
template <class T> T atomic_load_explicit(atomic<T>* p, memory_order) {
  return std::atomic_ref<T>(p->v).load(std::memory_order_relaxed);
}
template <class T> T atomic_fetch_add_explicit(atomic<T>* p, T v, memory_order) {
  return std::atomic_ref<T>(p->v).fetch_add(v, std::memory_order_relaxed);
}

// Simd collectives: a lane reading an inactive lane (past a partial simdgroup) gets NaN.
template <class T> T bad() { return T(NAN); }
template <class T> T simd_shuffle(T v, ushort src) {
  return emu::simd_exchange(v, [src](const T* x, unsigned, unsigned w) { return src < w ? x[src] : bad<T>(); });
}
template <class T> T simd_broadcast(T v, ushort src) { return simd_shuffle(v, src); }
template <class T> T simd_shuffle_xor(T v, ushort m) {
  return emu::simd_exchange(v, [m](const T* x, unsigned l, unsigned w) { unsigned s = (l ^ m) & 31; return s < w ? x[s] : bad<T>(); });
}
template <class T> T simd_shuffle_down(T v, ushort d) {  // lanes past the end keep their value
  return emu::simd_exchange(v, [d](const T* x, unsigned l, unsigned w) { return l + d < w ? x[l + d] : x[l]; });
}
template <class T> T simd_shuffle_up(T v, ushort d) {
  return emu::simd_exchange(v, [d](const T* x, unsigned l, unsigned) { return l >= d ? x[l - d] : x[l]; });
}
template <class T> T simd_sum(T v) {
  return emu::simd_exchange(v, [](const T* x, unsigned, unsigned w) { T s = x[0]; for (unsigned i = 1; i < w; ++i) s += x[i]; return s; });
}
template <class T> T simd_max(T v) {
  return emu::simd_exchange(v, [](const T* x, unsigned, unsigned w) { T s = x[0]; for (unsigned i = 1; i < w; ++i) s = x[i] > s ? x[i] : s; return s; });
}
template <class T> T simd_prefix_inclusive_sum(T v) {
  return emu::simd_exchange(v, [](const T* x, unsigned l, unsigned) { T s = x[0]; for (unsigned i = 1; i <= l; ++i) s += x[i]; return s; });
}
template <class T> T simd_prefix_exclusive_sum(T v) {
  return emu::simd_exchange(v, [](const T* x, unsigned l, unsigned) { T s = T(0); for (unsigned i = 0; i < l; ++i) s += x[i]; return s; });
}

// Math in float (the "safe" math mode): float overloads of <cmath>.
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float log2(float x) { return std::log2(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
template <class T> T max(T a, T b) { return a > b ? a : b; }
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
namespace precise { using metal::exp; using metal::log; using metal::tanh; }
namespace fast { using metal::exp; using metal::log; using metal::tanh; }
}  // namespace metal

using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;

// Address-space qualifiers vanish; threadgroup memory is a static shared by the fibers of a group.
#define device
#define constant
#define thread
#define threadgroup static thread_local
