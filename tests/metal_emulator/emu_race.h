// What the runtime tells the data-race detector (emu_race.cpp). The kernel and the runtime are
// compiled with g++'s ThreadSanitizer instrumentation, which calls __tsan_read4(p) and the like
// before every memory access; the detector, compiled without it, implements those calls.
#pragma once
#include <cstddef>

namespace emu {

// Barriers completed by a threadgroup (or a simdgroup), per memory they order.
struct RaceClock { unsigned epoch[2] = {0, 0}; };
enum : unsigned { ORDERS_THREADGROUP = 1, ORDERS_DEVICE = 2 };  // RaceClock::epoch[0], [1]

void race_layout(const char* path);  // the kernel's threadgroup arrays, as the harness found them
void race_grid(unsigned gx, unsigned gy, unsigned gz);  // threadgroups per grid (for messages)
void race_output(const void* p, std::size_t bytes, unsigned element, const char* name);
// This OS thread now runs threadgroup `group`; *running is the index of the running fiber.
void race_begin(unsigned long group, const int* running, const RaceClock* group_clock,
                const RaceClock* simd_clocks);
void race_end();

}  // namespace emu
