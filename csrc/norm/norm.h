// Launchers of the norm family (RMSNorm, SwiGLU, FP8 row-wise quantization). Pointers are device addresses.
#pragma once
#include <cstdint>
