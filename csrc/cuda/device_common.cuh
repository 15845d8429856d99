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
// A __shared__ array or scalar: NCFAST_SHARED(int, tile, [128]). The emulation gives each block
// its own instance, filled with garbage.
#define NCFAST_SHARED(type, name, dims) __shared__ type name dims
#endif

#include <atomic>
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

// Errors that say the driver cannot load the kernels on this GPU: no image for its
// architecture, or PTX newer than the driver (or a JIT that is missing or disabled).
inline bool is_image_error(cudaError_t err) {
  return err == cudaErrorInvalidKernelImage || err == cudaErrorNoKernelImageForDevice ||
         err == cudaErrorInvalidPtx || err == cudaErrorJitCompilerNotFound ||
         err == cudaErrorUnsupportedPtxVersion || err == cudaErrorJitCompilationDisabled;
}

template <typename Kernel>
cudaError_t load_error(Kernel kernel) {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, kernel);
}

// Loads each kernel of an op (cudaFuncGetAttributes JIT-compiles PTX where that is the image)
// before anything is launched, once per device: a kernel that cannot load then throws with
// kNoImage and nothing of the op has run. The load error is cleared, so that it is not
// reported again by the next unrelated check.
template <typename... Kernels>
void ensure_loadable(const char* op, Kernels... kernels) {
  static std::atomic<unsigned long long> loaded{0};  // bit d: device d loads them
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) device = 63;
  const unsigned long long bit = 1ull << device;
#ifndef NCFAST_CUDA_EMULATION  // (the emulation's tests inject load failures at any time)
  if (loaded.load(std::memory_order_relaxed) & bit) return;
#endif
  for (const cudaError_t err : {load_error(kernels)...}) {
    if (err == cudaSuccess) continue;
    cudaGetLastError();  // the load error is ours: clear it
    const std::string what =
        std::string(op) + "'s kernels on this GPU (" + cudaGetErrorString(err) + ")";
    throw std::runtime_error(is_image_error(err) ? std::string(kNoImage) + " for " + what
                                                 : "ncfast: cannot load " + what);
  }
  loaded.fetch_or(bit, std::memory_order_relaxed);
}

// Launches through `launch` and checks the launch. An error already pending before it (left
// by an earlier, asynchronous operation that nobody checked) is reported as such, not under
// this kernel's name.
template <typename Launch>
void launch_checked(const char* kernel, Launch&& launch) {
  const cudaError_t earlier = cudaGetLastError();
  if (earlier != cudaSuccess) {
    throw std::runtime_error(std::string("ncfast: a CUDA error was pending before the launch of ") +
                             kernel +
                             ", left by an earlier operation: " + cudaGetErrorString(earlier));
  }
  launch();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(is_image_error(err) ? kNoImage : "ncfast") +
                             ": launch of " + kernel + " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace ncfast
