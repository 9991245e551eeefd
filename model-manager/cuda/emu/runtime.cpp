// The scheduler of the CPU emulation (see README.md): every CUDA thread of a block is a fiber
// (ucontext) with its own stack; a fiber runs until it meets the others at a barrier or a warp
// collective, and the scheduler then runs the next runnable fiber in the launch's order.
// Built without ThreadSanitizer's instrumentation even in the TSan build: only the kernels'
// memory accesses are checked, and happens-before comes only from the barriers
// (`__syncthreads`, `__syncwarp`) and from one block's end to the next block's start.
#include "runtime.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef JHAKAAS_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef JHAKAAS_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace jhakaas_emu {

ThreadView* current = nullptr;

void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  fputs("cuda-emu: ", stderr);
  vfprintf(stderr, fmt, args);
  fputc('\n', stderr);
  va_end(args);
  fflush(stderr);
  _Exit(3);
}

namespace {

constexpr size_t kStackBytes = 256 << 10;
#ifdef JHAKAAS_EMU_ASAN
// A finished fiber leaves its outermost frames (fiber_main, yield) poisoned at the top of its
// stack; the frames below returned and cleaned up after themselves.
constexpr size_t kStaleTopBytes = 32 << 10;
#endif
constexpr size_t kGuardBytes = 4096;

std::vector<Kernel>& registry() {
  static std::vector<Kernel> kernels;
  return kernels;
}

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ThreadView view;
  unsigned id = 0, warp = 0, lane = 0;
  State state = State::Done;
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes above a guard page
#ifdef JHAKAAS_EMU_TSAN
  void* tsan_fiber = nullptr;
#endif
#ifdef JHAKAAS_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

/// What the lanes of a warp bring to a collective; all must bring the same.
struct Meeting {
  const char* what;
  int line;
  unsigned mask;
  const void* ptr;
  unsigned ldm;
  int layout;
};

struct Warp {
  unsigned lanes = 0, live = 0, waiting = 0, gen = 0;
  Meeting meeting[2][32];
  uint32_t value[2][32];
  float tile[2][256];  // a WMMA load's tile, gathered from the lanes' shares
  char sync[2];  // TSan's sync objects, one per generation parity
};

struct Block {
  std::vector<Fiber> fibers;  // grows to the largest block; stacks are reused
  std::vector<Warp> warps;
  unsigned threads = 0, live = 0, waiting = 0, gen = 0, exited = 0;
  int line = 0;  // the barrier's line while threads wait there
  char sync[2];
  // Runnable fibers, next first: a ring, since the scheduler must not allocate while fibers
  // run (TSan would see the allocator's memory pass between fibers and the scheduler).
  unsigned queue[1024];
  size_t head = 0, queued = 0;
  Order order = Order::Forward;
  uint64_t rng = 1;
  dim3 index;
};

Block block;
Fiber* running = nullptr;
ucontext_t scheduler;
const Kernel* kernel = nullptr;
void** kernel_params = nullptr;
#ifdef JHAKAAS_EMU_TSAN
char grid_sync;  // one block's end happens before the next block's start
void* scheduler_tsan = nullptr;
#endif
#ifdef JHAKAAS_EMU_ASAN
const void* scheduler_stack = nullptr;
size_t scheduler_stack_bytes = 0;
#endif

uint64_t next_random() {
  uint64_t z = (block.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

constexpr size_t kQueue = sizeof(block.queue) / sizeof(block.queue[0]);

/// Makes the `n` fibers `ids` (ascending) runnable, queued in the launch's order.
void wake(const unsigned* ids, size_t n) {
  for (size_t k = 0; k < n; ++k) {
    const unsigned id = block.order == Order::Reverse ? ids[n - 1 - k] : ids[k];
    block.fibers[id].state = State::Runnable;
    block.queue[(block.head + block.queued++) % kQueue] = id;
  }
}

/// The next fiber to run: the queue's first, or a random one.
unsigned pick() {
  size_t i = block.order == Order::Random ? next_random() % block.queued : 0;
  unsigned& chosen = block.queue[(block.head + i) % kQueue];
  unsigned& first = block.queue[block.head];
  std::swap(chosen, first);
  const unsigned id = first;
  block.head = (block.head + 1) % kQueue;
  --block.queued;
  return id;
}

void run_fiber(Fiber& f) {
  running = &f;
  current = &f.view;
#ifdef JHAKAAS_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef JHAKAAS_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&scheduler, &f.context);
#ifdef JHAKAAS_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  running = nullptr;
  current = nullptr;
}

/// Hands the CPU back to the scheduler; returns when this fiber is run again.
void yield(bool exiting) {
  Fiber& f = *running;
#ifdef JHAKAAS_EMU_TSAN
  __tsan_switch_to_fiber(scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef JHAKAAS_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, scheduler_stack,
                                 scheduler_stack_bytes);
#else
  (void)exiting;
#endif
  swapcontext(&f.context, &scheduler);
#ifdef JHAKAAS_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

const char* where() {
  static char text[96];
  const Fiber& f = *running;
  snprintf(text, sizeof text, "block (%u,%u,%u) thread %u (warp %u lane %u)", block.index.x,
           block.index.y, block.index.z, f.id, f.warp, f.lane);
  return text;
}

void fiber_main() {
#ifdef JHAKAAS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_bytes);
#endif
#ifdef JHAKAAS_EMU_TSAN
  __tsan_acquire(&grid_sync);
#endif
  kernel->invoke(kernel->fn, kernel_params);
  Fiber& f = *running;
  if (block.waiting > 0)
    fail("%s returned while %u threads wait at __syncthreads on line %d", where(), block.waiting,
         block.line);
  Warp& w = block.warps[f.warp];
  if (w.waiting > 0)
    fail("%s returned while %u lanes of its warp wait at %s on line %d", where(), w.waiting,
         w.meeting[w.gen & 1][0].what, w.meeting[w.gen & 1][0].line);
  f.state = State::Done;
  --block.live;
  ++block.exited;
  --w.live;
#ifdef JHAKAAS_EMU_TSAN
  __tsan_release(&grid_sync);
#endif
  yield(true);
  fail("a finished thread was resumed");
}

/// Maps the fiber stacks for `threads` threads (once; later blocks reuse them).
void ensure_fibers(unsigned threads) {
  while (block.fibers.size() < threads) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(m, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting
    block.fibers.emplace_back();
    block.fibers.back().stack = static_cast<char*>(m) + kGuardBytes;
#ifdef JHAKAAS_EMU_TSAN
    // One TSan fiber per slot for the whole run: thread i of the next block continues it, and
    // the end of a block happens before the next one starts anyway.
    block.fibers.back().tsan_fiber = __tsan_create_fiber(0);
#endif
  }
}

#ifdef JHAKAAS_EMU_POISON_SHARED
extern "C" char __start_jhakaas_emu_shared[] __attribute__((weak));
extern "C" char __stop_jhakaas_emu_shared[] __attribute__((weak));
#endif

void run_block(dim3 index, dim3 grid, dim3 dim) {
  const unsigned threads = dim.x * dim.y * dim.z;
  ensure_fibers(threads);
#ifdef JHAKAAS_EMU_POISON_SHARED
  if (!__start_jhakaas_emu_shared) fail("the build did not gather __shared__ memory (shared.ld)");
  memset(__start_jhakaas_emu_shared, 0xff, __stop_jhakaas_emu_shared - __start_jhakaas_emu_shared);
#endif
  block.index = index;
  block.threads = block.live = threads;
  block.waiting = block.exited = 0;
  block.warps.assign((threads + 31) / 32, Warp{});
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = block.fibers[i];
    f.view = ThreadView{dim3{i % dim.x, (i / dim.x) % dim.y, i / (dim.x * dim.y)}, index, dim, grid};
    f.id = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::Runnable;
    ++block.warps[f.warp].lanes;
    ++block.warps[f.warp].live;
#ifdef JHAKAAS_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack + kStackBytes - kStaleTopBytes, kStaleTopBytes);
#endif
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
#ifdef JHAKAAS_EMU_TSAN
  __tsan_release(&grid_sync);  // the block's setup (and the last block) before its threads
#endif
  static unsigned ids[1024];
  for (unsigned i = 0; i < threads; ++i) ids[i] = i;
  block.head = block.queued = 0;
  wake(ids, threads);
  while (block.queued > 0) run_fiber(block.fibers[pick()]);
  if (block.live > 0) {
    std::string waits;
    for (unsigned i = 0; i < threads; ++i) {
      const Fiber& f = block.fibers[i];
      if (f.state == State::AtBarrier) waits += " " + std::to_string(i) + "@__syncthreads";
      if (f.state == State::AtWarp) waits += " " + std::to_string(i) + "@warp";
    }
    fail("deadlock in block (%u,%u,%u): threads that wait:%s", index.x, index.y, index.z,
         waits.c_str());
  }
#ifdef JHAKAAS_EMU_TSAN
  __tsan_acquire(&grid_sync);
#endif
}

/// Brings the running lane to a warp collective; returns the generation parity it met in.
unsigned meet_warp(const Meeting& m, uint32_t value, bool barrier) {
  Fiber& f = *running;
  Warp& w = block.warps[f.warp];
  const unsigned full = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1;
  if (w.live != w.lanes)
    fail("%s: %s on line %d after a lane of its warp returned", where(), m.what, m.line);
  if ((m.mask & full) != full)
    fail("%s: %s on line %d with mask %#x; only whole-warp masks are emulated", where(), m.what,
         m.line, m.mask);
  const unsigned slot = w.gen & 1;
  w.meeting[slot][f.lane] = m;
  w.value[slot][f.lane] = value;
#ifdef JHAKAAS_EMU_TSAN
  if (barrier) __tsan_release(&w.sync[slot]);
#endif
  f.state = State::AtWarp;
  if (++w.waiting == w.live) {
    const Meeting& a = w.meeting[slot][0];
    for (unsigned l = 1; l < w.lanes; ++l) {
      const Meeting& b = w.meeting[slot][l];
      if (strcmp(a.what, b.what) != 0 || a.line != b.line || a.ptr != b.ptr || a.ldm != b.ldm ||
          a.layout != b.layout || a.mask != b.mask)
        fail("block (%u,%u,%u) warp %u diverged: lane 0 at %s (line %d, ptr %p, ldm %u), lane %u "
             "at %s (line %d, ptr %p, ldm %u)",
             block.index.x, block.index.y, block.index.z, f.warp, a.what, a.line, a.ptr, a.ldm, l,
             b.what, b.line, b.ptr, b.ldm);
    }
    unsigned lanes[32];
    for (unsigned l = 0; l < w.lanes; ++l) lanes[l] = f.warp * 32 + l;
    w.waiting = 0;
    ++w.gen;
    wake(lanes, w.lanes);
  }
  yield(false);
#ifdef JHAKAAS_EMU_TSAN
  if (barrier) __tsan_acquire(&w.sync[slot]);
#else
  (void)barrier;
#endif
  return slot;
}

}  // namespace

void register_kernel(const Kernel& k) { registry().push_back(k); }

const Kernel* find_kernel(const char* name) {
  for (const Kernel& k : registry())
    if (strcmp(k.name, name) == 0) return &k;
  return nullptr;
}

unsigned lane_id() { return running->lane; }

void sync_threads(int line) {
  Fiber& f = *running;
  if (block.exited > 0)
    fail("%s: __syncthreads on line %d after %u threads of the block returned", where(), line,
         block.exited);
  if (block.waiting == 0) {
    block.line = line;
  } else if (block.line != line) {
    fail("%s waits at __syncthreads on line %d while %u threads wait on line %d", where(), line,
         block.waiting, block.line);
  }
  const unsigned slot = block.gen & 1;
#ifdef JHAKAAS_EMU_TSAN
  __tsan_release(&block.sync[slot]);
#endif
  f.state = State::AtBarrier;
  if (++block.waiting == block.live) {
    static unsigned ids[1024];
    size_t n = 0;
    for (unsigned i = 0; i < block.threads; ++i)
      if (block.fibers[i].state == State::AtBarrier) ids[n++] = i;
    block.waiting = 0;
    ++block.gen;
    wake(ids, n);
  }
  yield(false);
#ifdef JHAKAAS_EMU_TSAN
  __tsan_acquire(&block.sync[slot]);
#else
  (void)slot;
#endif
}

void sync_warp(int line, unsigned mask) {
  meet_warp(Meeting{"__syncwarp", line, mask, nullptr, 0, 0}, 0, true);
}

uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask, int width) {
  if (width != 32) fail("%s: __shfl_xor_sync with width %d is not emulated", where(), width);
  const unsigned slot =
      meet_warp(Meeting{"__shfl_xor_sync", 0, mask, nullptr, (unsigned)lane_mask, 0}, v, false);
  const Warp& w = block.warps[running->warp];
  const unsigned src = running->lane ^ (unsigned)lane_mask;
  return src < w.lanes ? w.value[slot][src] : v;
}

void wmma_collective(const char* what, const void* ptr, unsigned ldm, int layout,
                     size_t elem_bytes) {
  if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    fail("%s: %s at %p, which is not 256-bit aligned", where(), what, ptr);
  if (elem_bytes != 0 && (ldm * elem_bytes) % 16 != 0)
    fail("%s: %s with ldm %u, not a multiple of 16 bytes", where(), what, ldm);
  meet_warp(Meeting{what, 0, 0xffffffffu, ptr, ldm, layout}, 0, false);
}

void wmma_load(const char* what, const void* ptr, unsigned ldm, int layout, size_t elem_bytes,
               const float* share, float* tile, int count) {
  Warp& w = block.warps[running->warp];
  if (count > 256) fail("%s: a %d-element tile is beyond the emulation", what, count);
  const unsigned slot = w.gen & 1;  // the generation this meeting completes
  for (int e = (int)running->lane; e < count; e += 32) w.tile[slot][e] = share[e];
  wmma_collective(what, ptr, ldm, layout, elem_bytes);
  memcpy(tile, w.tile[slot], count * sizeof(float));
}

void launch(const Kernel& k, dim3 grid, dim3 dim, void** params, const LaunchOptions& options) {
  const unsigned long long threads = (unsigned long long)dim.x * dim.y * dim.z;
  if (threads == 0 || threads > 1024 || dim.x > 1024 || dim.y > 1024 || dim.z > 64)
    fail("%s: block (%u,%u,%u) is beyond CUDA's limits", k.name, dim.x, dim.y, dim.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    fail("%s: grid (%u,%u,%u) is beyond CUDA's limits", k.name, grid.x, grid.y, grid.z);
#ifdef JHAKAAS_EMU_TSAN
  if (!scheduler_tsan) scheduler_tsan = __tsan_get_current_fiber();
#endif
  kernel = &k;
  kernel_params = params;
  block.order = options.order;
  block.rng = options.seed;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3{x, y, z});
  if (options.order == Order::Reverse) std::reverse(blocks.begin(), blocks.end());
  if (options.order == Order::Random)
    for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[next_random() % i]);
  for (const dim3& b : blocks) run_block(b, grid, dim);
}

}  // namespace jhakaas_emu
