// The host side of the CPU emulation (see README.md): finding a kernel and launching it.
#pragma once
#include "jhakaas_cuda_emu.h"

namespace jhakaas_emu {

/// The order the threads of a block (and the blocks of a grid) run in. A kernel whose result
/// changes with the order has a race.
enum class Order { Forward, Reverse, Random };

/// How a launch runs.
struct LaunchOptions {
  Order order = Order::Forward;
  uint64_t seed = 1;  // for Order::Random
};

/// The kernel registered under `name`, or null.
const Kernel* find_kernel(const char* name);

/// Runs `kernel` over `grid` × `block` with cuLaunchKernel's argument packing (`params[i]`
/// points at the i-th argument's value). Checks CUDA's launch limits first; calls `fail` on a
/// deadlock, a diverged barrier or a misused collective.
void launch(const Kernel& kernel, dim3 grid, dim3 block, void** params,
            const LaunchOptions& options);

}  // namespace jhakaas_emu
