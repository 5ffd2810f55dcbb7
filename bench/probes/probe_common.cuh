// What the standalone probes share: the error check and the row of the issue-14 workload.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));    \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

constexpr int kRowBytes = 7168;                   // H = 7168 FP8
constexpr int kVecPerLane = kRowBytes / 16 / 32;  // 14 loads of 16 bytes per lane
