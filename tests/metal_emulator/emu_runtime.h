// GPU execution model on the CPU, shared by the Metal and CUDA emulation headers.
// Every GPU thread of a threadgroup is a fiber (ucontext); the fibers of a group run on one OS
// thread and switch only at barriers and simd collectives, so a missing barrier reads stale
// threadgroup memory, and a barrier or collective that some threads never reach is reported as a
// deadlock. Threadgroups are spread over a few OS threads. Barriers advance the clocks that the
// data-race detector (emu_race.h) orders memory accesses by.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "emu_race.h"

// The runtime's own memory traffic is not the kernel's: the race detector need not see it. (g++
// inlines nothing instrumented into these functions, so they reach the group through raw pointers.)
#define EMU_UNWATCHED __attribute__((no_sanitize("thread")))

namespace emu {

struct Dim { unsigned x = 1, y = 1, z = 1; };

struct Fiber {
  ucontext_t ctx;
  bool done = false, waiting = false;
  Dim local;        // position in the group
  unsigned index;   // linear index in the group
  void* user = nullptr;  // the front end's per-thread data (CUDA's threadIdx...)
};

struct Rendezvous {  // a reusable barrier among `total` fibers
  unsigned count = 0, gen = 0, total = 0;
  unsigned orders = ~0u;  // the memory that every fiber arrived so far asked to order
};

struct SimdGroup {
  Rendezvous rv;
  alignas(16) unsigned char slot[32][16];
};

struct Group {
  Dim pos, size, grid_groups;  // group position, its actual size, groups per grid
  unsigned n = 0;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simd;
  Rendezvous bar;
  RaceClock clock;                    // barriers completed, per memory they order
  std::vector<RaceClock> simd_clock;  // simdgroup barriers completed, per simdgroup
  Fiber* fiber = nullptr;             // fibers, simd, simd_clock's data()
  SimdGroup* simds = nullptr;
  RaceClock* simd_clocks = nullptr;
  ucontext_t sched;
  int cur = -1;
  unsigned long progress = 0;
  void (*invoke)(const void*, Group&, Fiber&) = nullptr;  // runs the kernel for one fiber
  const void* body = nullptr;
};

inline thread_local Group* g_group = nullptr;
EMU_UNWATCHED inline Fiber& self() { return g_group->fiber[g_group->cur]; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

// Waits until all fibers of the rendezvous arrive; then the memory that all of them asked to
// order (ORDERS_THREADGROUP, ORDERS_DEVICE) advances one epoch on `clock`.
EMU_UNWATCHED inline void wait_all(Rendezvous& r, RaceClock* clock = nullptr, unsigned orders = 0) {
  Group& G = *g_group;
  unsigned my = r.gen;
  ++G.progress;
  r.orders &= orders;
  if (++r.count == r.total) {
    for (unsigned m = 0; clock && m < 2; ++m) clock->epoch[m] += (r.orders >> m) & 1u;
    r.count = 0;
    r.orders = ~0u;
    ++r.gen;
    return;
  }
  while (r.gen == my) {
    self().waiting = true;
    swapcontext(&self().ctx, &G.sched);
  }
  self().waiting = false;
}

EMU_UNWATCHED inline void barrier(unsigned orders) { wait_all(g_group->bar, &g_group->clock, orders); }

EMU_UNWATCHED inline unsigned lane_id() { return self().index % 32; }
EMU_UNWATCHED inline SimdGroup& my_simd() { return g_group->simds[self().index / 32]; }
EMU_UNWATCHED inline unsigned simd_width() { return my_simd().rv.total; }
EMU_UNWATCHED inline void simd_barrier(unsigned orders) {
  wait_all(my_simd().rv, &g_group->simd_clocks[self().index / 32], orders);
}

// A collective over the fiber's simdgroup: every lane publishes v, then f(values, lane, width).
template <class T, class F>
EMU_UNWATCHED T simd_exchange(T v, F f) {
  static_assert(sizeof(T) <= 16, "simd value too large");
  SimdGroup& s = my_simd();
  unsigned lane = lane_id();
  std::memcpy(s.slot[lane], &v, sizeof(T));
  wait_all(s.rv);
  T vals[32];
  for (unsigned i = 0; i < s.rv.total; ++i) std::memcpy(&vals[i], s.slot[i], sizeof(T));
  wait_all(s.rv);  // nobody overwrites a slot before every lane has read it
  return f(vals, lane, s.rv.total);
}

EMU_UNWATCHED inline void trampoline() {
  Group& G = *g_group;
  G.invoke(G.body, G, G.fiber[G.cur]);
  G.fiber[G.cur].done = true;
}

// Runs the group's fibers, in the order idx[0..n) each round (order 2: shuffled afresh).
EMU_UNWATCHED inline void schedule(Group& G, unsigned* idx, int order, unsigned seed) {
  for (unsigned alive = G.n; alive > 0;) {
    for (unsigned i = G.n - 1; order == 2 && i > 0; --i) {  // Fisher-Yates with an LCG
      seed = seed * 1664525u + 1013904223u;
      const unsigned j = (seed >> 8) % (i + 1), t = idx[i];
      idx[i] = idx[j];
      idx[j] = t;
    }
    unsigned long before = G.progress;
    unsigned finished = 0;
    for (unsigned k = 0; k < G.n; ++k) {
      Fiber& f = G.fiber[idx[k]];
      if (f.done) continue;
      G.cur = static_cast<int>(idx[k]);
      swapcontext(&G.sched, &f.ctx);
      if (f.done) ++finished;
    }
    alive -= finished;
    if (alive > 0 && finished == 0 && G.progress == before)
      fail("deadlock: a barrier or simd collective is not reached by every thread of the group");
  }
}

// order: 0 lanes in order, 1 reversed, 2 shuffled afresh every round (seeded).
inline void run_group(Group& G, unsigned long id, std::vector<std::vector<char>>& stacks, int order,
                      unsigned seed) {
  g_group = &G;
  G.n = G.size.x * G.size.y * G.size.z;
  G.fibers.assign(G.n, Fiber{});
  G.bar = Rendezvous{0, 0, G.n};
  G.simd.assign((G.n + 31) / 32, SimdGroup{});
  for (unsigned s = 0; s < G.simd.size(); ++s) G.simd[s].rv.total = std::min(32u, G.n - 32 * s);
  G.simd_clock.assign(G.simd.size(), RaceClock{});
  G.fiber = G.fibers.data();
  G.simds = G.simd.data();
  G.simd_clocks = G.simd_clock.data();
  if (stacks.size() < G.n) stacks.resize(G.n, std::vector<char>(256 * 1024));
  for (unsigned i = 0; i < G.n; ++i) {
    Fiber& f = G.fibers[i];
    f.index = i;
    f.local = Dim{i % G.size.x, (i / G.size.x) % G.size.y, i / (G.size.x * G.size.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i].data();
    f.ctx.uc_stack.ss_size = stacks[i].size();
    f.ctx.uc_link = &G.sched;
    makecontext(&f.ctx, trampoline, 0);
  }
  race_begin(id, &G.cur, &G.clock, G.simd_clocks);
  std::vector<unsigned> idx(G.n);
  for (unsigned i = 0; i < G.n; ++i) idx[i] = order == 1 ? G.n - 1 - i : i;
  schedule(G, idx.data(), order, seed);
  race_end();
  g_group = nullptr;
}

// Runs every threadgroup of a launch; groups is the count per dimension, size(gpos) the actual
// size of the group at gpos (Metal's edge groups can be smaller).
template <class SizeFn, class Body>
void launch(Dim groups, SizeFn size, const Body& body, int order, unsigned seed, unsigned workers) {
  unsigned long total = static_cast<unsigned long>(groups.x) * groups.y * groups.z;
  std::atomic<unsigned long> next{0};
  auto work = [&]() {
    std::vector<std::vector<char>> stacks;
    for (unsigned long k; (k = next.fetch_add(1)) < total;) {
      Group G;
      G.pos = Dim{unsigned(k % groups.x), unsigned((k / groups.x) % groups.y),
                  unsigned(k / (static_cast<unsigned long>(groups.x) * groups.y))};
      G.size = size(G.pos);
      G.grid_groups = groups;
      G.body = &body;
      G.invoke = [](const void* b, Group& g, Fiber& f) { (*static_cast<const Body*>(b))(g, f); };
      run_group(G, k, stacks, order, seed + unsigned(k));
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < std::max(1u, workers); ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// Buffers travel through files: [int64 nbytes, bytes] per buffer, in kernel argument order.
inline std::vector<std::vector<char>> read_buffers(const char* path) {
  std::vector<std::vector<char>> bufs;
  FILE* f = std::fopen(path, "rb");
  if (!f) fail("cannot open the input file");
  int64_t nb;
  while (std::fread(&nb, sizeof nb, 1, f) == 1) {
    bufs.emplace_back(nb + 128, char(0x5a));  // 64 canary bytes on each side
    if (std::fread(bufs.back().data() + 64, 1, nb, f) != size_t(nb)) fail("short input file");
  }
  std::fclose(f);
  return bufs;
}

inline void write_buffers(const char* path, const std::vector<std::vector<char>>& bufs) {
  FILE* f = std::fopen(path, "wb");
  for (auto& b : bufs) {
    for (size_t i = 0; i < 64; ++i)
      if (b[i] != char(0x5a) || b[b.size() - 1 - i] != char(0x5a))
        fail("out-of-bounds write: a buffer's canary bytes changed");
    int64_t nb = b.size() - 128;
    std::fwrite(&nb, sizeof nb, 1, f);
    std::fwrite(b.data() + 64, 1, nb, f);
  }
  std::fclose(f);
}

}  // namespace emu
