// Device helpers shared by the CUDA kernels of both ops (update_stats.cu, ncc_mismatch.cu).
// Compiled by nvcc, and for the tests on the CPU through tests/cuda_emulation/, which defines
// NCFAST_CUDA_EMULATION and emulates the CUDA execution model (so the logic of these very
// sources is tested without a GPU).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifndef NCFAST_CUDA_EMULATION
#include <cuda_runtime.h>
#define NCFAST_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "kernels.h"

namespace ncfast {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_double<double>(double v) {
  return v;
}

// Exponent-all-ones test: independent of any fast-math flag.
template <typename T>
__device__ __forceinline__ bool is_finite_value(T v) {
  return (__float_as_uint(static_cast<float>(v)) & 0x7f800000u) != 0x7f800000u;
}
template <>
__device__ __forceinline__ bool is_finite_value<double>(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ncfast: launch of ") + what +
                             " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace ncfast
