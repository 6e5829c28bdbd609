// Data-race detector for the emulated kernels. Compiled WITHOUT -fsanitize=thread and linked with a
// kernel compiled WITH it: g++ then calls __tsan_read4(p), __tsan_write4(p), __tsan_atomic32_...
// before every memory access of the kernel (and of the runtime), and these functions, defined here
// in place of the ThreadSanitizer library, check the accesses to the kernel's threadgroup arrays and
// device outputs against a shadow of every byte (threadgroup) or element (device):
// the last writer, and the readers, plain and atomic, each with the barrier epoch of its access.
// Two accesses by different threads conflict when one of them is a plain write, or one is an
// atomic write and the other a plain access; they are ordered when the same threadgroup completed a
// barrier that orders that memory (or a simdgroup barrier, for lanes of one simdgroup) between
// them. Threads of different threadgroups are never ordered on device memory. A conflicting pair
// that is not ordered is a data race, reported whatever the fiber schedule, since the fibers only
// interleave at barriers and simd collectives. Reading threadgroup memory that no thread of the
// group wrote is reported too (on a GPU it holds garbage).
#include "emu_race.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace emu {

thread_local char race_anchor;  // the harness reads its offset in the TLS block, and the arrays'

namespace {

enum Space { THREADGROUP = 0, DEVICE = 1 };
enum Kind { READ, WRITE, ATOMIC_READ, ATOMIC_WRITE };
const char* const VERB[] = {"read it", "wrote it", "read it atomically", "wrote it atomically"};

struct Access { uint32_t group = 0, thread = 0, epoch = 0, sepoch = 0; };  // thread: index + 1; 0 none
struct Cell { Access w, r[2], aw[2], ar[2]; };  // plain writer, plain readers, atomic writers, readers

struct Region {
  uintptr_t lo = 0, hi = 0;
  unsigned granule = 1;  // bytes per shadow cell
  Space space = THREADGROUP;
  std::string name;
  Cell* cells = nullptr;
};

struct Pending { const Region* region = nullptr; uintptr_t q = 0; size_t n = 0; Access reader; };

struct Thread {  // one per OS thread; the groups it runs share its threadgroup arrays (TLS)
  bool active = false;
  Pending unwritten;  // the group's first read of threadgroup memory that it had not written
  uint32_t group = 0;
  const int* running = nullptr;
  const RaceClock *clock = nullptr, *simd = nullptr;
  std::vector<Region> arrays;
};

struct Array { long offset, size; std::string name; };
long g_anchor = -1;
std::vector<Array> g_arrays;
std::vector<Region> g_outputs;
uintptr_t g_out_lo = UINTPTR_MAX, g_out_hi = 0;
std::mutex g_outputs_lock;
unsigned g_grid[3] = {1, 1, 1};
thread_local Thread* t_thread = nullptr;  // plain pointer: no TLS wrapper call on the fast path

Cell* shadow(size_t n) {
  void* p = std::calloc(n, sizeof(Cell));  // zero pages come lazily from the OS
  if (!p) {
    std::fprintf(stderr, "emu: out of memory for the race detector's shadow\n");
    std::_Exit(3);
  }
  return static_cast<Cell*>(p);
}

std::string who(const Access& a) {
  unsigned long g = a.group;
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread %u of threadgroup (%lu,%lu,%lu)", a.thread - 1, g % g_grid[0],
                g / g_grid[0] % g_grid[1], g / (static_cast<unsigned long>(g_grid[0]) * g_grid[1]));
  return buf;
}

std::string where(const Region& R, uintptr_t q, size_t n) {
  const size_t unit = R.space == DEVICE ? R.granule : n;
  return std::string(R.space == DEVICE ? "device output '" : "threadgroup array '") + R.name + "'[" +
         std::to_string((q - R.lo) / unit) + "]";
}

[[noreturn]] void report(const Region& R, uintptr_t q, size_t n, const Access& now, Kind k,
                         const Access& prev, Kind pk) {
  const bool w = k == WRITE || k == ATOMIC_WRITE, pw = pk == WRITE || pk == ATOMIC_WRITE;
  const char* pair = w && pw ? "write after write" : w ? "write after read" : "read after write";
  const char* why = now.group != prev.group ? "(threads of different threadgroups never synchronize)"
                                             : "with no barrier between them";
  std::fprintf(stderr, "emu: data race (%s) on %s: %s %s, then %s %s %s\n", pair,
               where(R, q, n).c_str(), who(prev).c_str(), VERB[pk], who(now).c_str(), VERB[k], why);
  std::fflush(stderr);
  std::_Exit(3);
}

// Did access a happen before `now` (or can it not conflict with it)?
bool ordered(const Access& a, const Access& now, Space space) {
  if (a.thread == 0) return true;
  if (a.group != now.group) return space == THREADGROUP;  // a previous group's (threadgroup memory)
  if (a.thread == now.thread || a.epoch < now.epoch) return true;
  return (a.thread - 1) / 32 == (now.thread - 1) / 32 && a.sepoch < now.sepoch;
}

// Keeps at most two accesses, enough that any later access unordered with one of all the accesses
// seen is unordered with one of those kept.
void remember(Access (&set)[2], const Access& now, Space space) {
  for (Access& e : set)
    if (e.thread == now.thread && e.group == now.group) return void(e = now);
  for (Access& e : set)
    if (ordered(e, now, space)) return void(e = now);
  if (set[0].group == set[1].group && set[0].group != now.group) set[set[0].epoch > set[1].epoch] = now;
}

void visit(const Region& R, Cell& c, uintptr_t q, size_t n, const Access& now, Kind k) {
  auto check = [&](const Access& prev, Kind pk) {
    if (!ordered(prev, now, R.space)) report(R, q, n, now, k, prev, pk);
  };
  // Atomic accesses conflict with plain ones only.
  check(c.w, WRITE);
  if (k == READ || k == WRITE)
    for (const Access& a : c.aw) check(a, ATOMIC_WRITE);
  if (k == WRITE || k == ATOMIC_WRITE)
    for (const Access& a : c.r) check(a, READ);
  if (k == WRITE)
    for (const Access& a : c.ar) check(a, ATOMIC_READ);
  Pending& unwritten = t_thread->unwritten;
  if (R.space == THREADGROUP && (k == READ || k == ATOMIC_READ) && !unwritten.region) {
    bool written = c.w.thread && c.w.group == now.group;
    for (const Access& a : c.aw) written |= a.thread && a.group == now.group;
    if (!written) unwritten = Pending{&R, q, n, now};  // reported at the group's end, unless a race is
  }
  switch (k) {
    case READ: remember(c.r, now, R.space); break;
    case ATOMIC_READ: remember(c.ar, now, R.space); break;
    case ATOMIC_WRITE: remember(c.aw, now, R.space); break;
    case WRITE: c = Cell{}; c.w = now; break;  // everything before is ordered before this write
  }
}

void check_region(const Region& R, uintptr_t p, size_t n, Kind k) {
  const Thread& T = *t_thread;
  const unsigned index = static_cast<unsigned>(*T.running);
  const Access now{T.group, index + 1, T.clock->epoch[R.space], T.simd[index / 32].epoch[R.space]};
  const uintptr_t lo = p > R.lo ? p : R.lo, hi = p + n < R.hi ? p + n : R.hi;
  for (uintptr_t q = lo - (lo - R.lo) % R.granule; q < hi; q += R.granule)
    visit(R, R.cells[(q - R.lo) / R.granule], q, n, now, k);
}

void on_access(const volatile void* ptr, size_t n, Kind k) {
  const Thread* T = t_thread;
  if (!T || !T->active) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  for (const Region& R : T->arrays)
    if (p < R.hi && p + n > R.lo) check_region(R, p, n, k);
  if (p < g_out_hi && p + n > g_out_lo)
    for (const Region& R : g_outputs)
      if (p < R.hi && p + n > R.lo) {
        std::lock_guard<std::mutex> hold(g_outputs_lock);  // groups run on several OS threads
        check_region(R, p, n, k);
      }
}

}  // namespace

void race_layout(const char* path) {  // lines "offset size name"; the first names the anchor
  FILE* f = std::fopen(path, "r");
  if (!f) return;
  long off, size;
  char name[256];
  while (std::fscanf(f, "%ld %ld %255s", &off, &size, name) == 3) {
    if (g_anchor < 0) g_anchor = off;
    else g_arrays.push_back(Array{off, size, name});
  }
  std::fclose(f);
}

void race_grid(unsigned gx, unsigned gy, unsigned gz) {
  g_grid[0] = gx;
  g_grid[1] = gy;
  g_grid[2] = gz;
}

void race_output(const void* p, size_t bytes, unsigned element, const char* name) {
  Region R;
  R.lo = reinterpret_cast<uintptr_t>(p);
  R.hi = R.lo + bytes;
  R.granule = element;
  R.space = DEVICE;
  R.name = name;
  R.cells = shadow(bytes / element + 1);
  g_out_lo = std::min(g_out_lo, R.lo);
  g_out_hi = std::max(g_out_hi, R.hi);
  g_outputs.push_back(R);
}

void race_begin(unsigned long group, const int* running, const RaceClock* group_clock,
                const RaceClock* simd_clocks) {
  if (!t_thread) {
    t_thread = new Thread;
    const uintptr_t base = reinterpret_cast<uintptr_t>(&race_anchor) - g_anchor;
    for (const Array& a : g_arrays) {
      Region R;
      R.lo = base + a.offset;
      R.hi = R.lo + a.size;
      R.name = a.name;
      R.cells = shadow(a.size);
      t_thread->arrays.push_back(R);
    }
  }
  Thread& T = *t_thread;
  T.group = static_cast<uint32_t>(group);
  T.running = running;
  T.clock = group_clock;
  T.simd = simd_clocks;
  T.active = true;
}

void race_end() {
  if (!t_thread) return;
  t_thread->active = false;
  const Pending& p = t_thread->unwritten;
  if (p.region) {
    std::fprintf(stderr, "emu: %s was read by %s before any thread of its threadgroup wrote it "
                 "(threadgroup memory starts undefined)\n", where(*p.region, p.q, p.n).c_str(),
                 who(p.reader).c_str());
    std::fflush(stderr);
    std::_Exit(3);
  }
}

}  // namespace emu

// The ThreadSanitizer entry points that g++ instruments with (the public ABI of its runtime).
using emu::on_access;
using emu::Kind;

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, emu::READ); }
void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, emu::WRITE); }

#define EMU_PLAIN(N)                                                                  \
  void __tsan_read##N(void* p) { on_access(p, N, emu::READ); }                        \
  void __tsan_write##N(void* p) { on_access(p, N, emu::WRITE); }                      \
  void __tsan_unaligned_read##N(void* p) { on_access(p, N, emu::READ); }              \
  void __tsan_unaligned_write##N(void* p) { on_access(p, N, emu::WRITE); }            \
  void __tsan_volatile_read##N(void* p) { on_access(p, N, emu::READ); }               \
  void __tsan_volatile_write##N(void* p) { on_access(p, N, emu::WRITE); }
EMU_PLAIN(1)
EMU_PLAIN(2)
EMU_PLAIN(4)
EMU_PLAIN(8)
EMU_PLAIN(16)

void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  on_access(s, n, emu::READ);
  on_access(d, n, emu::WRITE);
  return std::memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  on_access(s, n, emu::READ);
  on_access(d, n, emu::WRITE);
  return std::memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
  on_access(d, n, emu::WRITE);
  return std::memset(d, c, n);
}

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

// Atomics run sequentially consistent whatever order they ask for; they are atomic accesses for the
// detector (a compare-exchange that fails only reads).
#define EMU_RMW(N, T, OP)                                                        \
  T __tsan_atomic##N##_##OP(volatile T* a, T v, int) {                           \
    on_access(a, sizeof(T), emu::ATOMIC_WRITE);                                  \
    return __atomic_##OP(a, v, __ATOMIC_SEQ_CST);                                \
  }
#define EMU_ATOMICS(N, T)                                                                       \
  T __tsan_atomic##N##_load(const volatile T* a, int) {                                         \
    on_access(a, sizeof(T), emu::ATOMIC_READ);                                                  \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                \
  }                                                                                             \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                      \
    on_access(a, sizeof(T), emu::ATOMIC_WRITE);                                                 \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                   \
  }                                                                                             \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                      \
    on_access(a, sizeof(T), emu::ATOMIC_WRITE);                                                 \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                             \
  EMU_RMW(N, T, fetch_add)                                                                      \
  EMU_RMW(N, T, fetch_sub)                                                                      \
  EMU_RMW(N, T, fetch_and)                                                                      \
  EMU_RMW(N, T, fetch_or)                                                                       \
  EMU_RMW(N, T, fetch_xor)                                                                      \
  EMU_RMW(N, T, fetch_nand)                                                                     \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {          \
    const bool ok = __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    on_access(a, sizeof(T), ok ? emu::ATOMIC_WRITE : emu::ATOMIC_READ);                         \
    return ok;                                                                                  \
  }                                                                                             \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int m, int f) {        \
    return __tsan_atomic##N##_compare_exchange_strong(a, c, v, m, f);                           \
  }                                                                                             \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int m, int f) {            \
    __tsan_atomic##N##_compare_exchange_strong(a, &c, v, m, f);                                 \
    return c;                                                                                   \
  }
EMU_ATOMICS(8, char)
EMU_ATOMICS(16, short)
EMU_ATOMICS(32, int)
EMU_ATOMICS(64, long)
}
