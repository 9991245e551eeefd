// Stand-in for CUDA's <mma.h> under the CPU emulation (see ../README.md).
#pragma once
#include "jhakaas_cuda_emu.h"
