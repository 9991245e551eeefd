// Stand-in for CUDA's <cuda_bf16.h> under the CPU emulation (see ../README.md).
#pragma once
#include "jhakaas_cuda_emu.h"
