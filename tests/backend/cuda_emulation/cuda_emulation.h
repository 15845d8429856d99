// A CPU emulation of the parts of the CUDA execution model that the kernels of csrc/cuda/ use,
// so that the kernels' own source runs in the tests on machines without a GPU (not part of the
// extension; built by tests/test_native_cuda_emulation.py).
//
// Every thread of a block is a std::thread; __syncthreads is a std::barrier over the block and
// the warp collectives exchange values through a per-warp slot array and barrier. Blocks run in
// a shuffled order (seeded), kConcurrentBlocks at a time, so atomics, fences and anything one
// block hands to another are exercised by blocks running at once. Shared memory
// (NCFAST_SHARED) is a fresh allocation per block, filled with seeded garbage: a kernel that
// reads it before writing it gets wrong numbers here, as it may on a GPU. Error injection
// (emu::fail_load, emu::pending_error) stands for a kernel image the driver cannot load and for
// an error left by an earlier, unrelated launch.
// What it cannot show: the GPU's weaker memory model (the host's is stronger), warp-level
// scheduling, performance.
#pragma once

#define NCFAST_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <utility>
#include <vector>

using std::isnan;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
using cudaError_t = int;
// The runtime's values of the errors the kernels' launch code tells apart (driver_types.h).
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
constexpr cudaError_t cudaErrorInvalidKernelImage = 200;
constexpr cudaError_t cudaErrorNoKernelImageForDevice = 209;
constexpr cudaError_t cudaErrorInvalidPtx = 218;
constexpr cudaError_t cudaErrorJitCompilerNotFound = 221;
constexpr cudaError_t cudaErrorUnsupportedPtxVersion = 222;
constexpr cudaError_t cudaErrorJitCompilationDisabled = 223;
struct cudaFuncAttributes {
  int numRegs = 0;
};

namespace emu {

inline cudaError_t pending_error = cudaSuccess;  // as left by an earlier launch: read once
inline cudaError_t fail_load = cudaSuccess;      // what loading any kernel reports

struct Warp {
  std::barrier<> barrier{32};
  alignas(8) unsigned char slots[32][8];
};

// One running block: its barrier, its warps and its shared memory.
struct Block {
  explicit Block(unsigned threads, unsigned garbage_seed)
      : barrier(threads), warps((threads + 31) / 32), garbage(garbage_seed) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex mutex;
  std::map<const void*, std::unique_ptr<unsigned char[]>> shared;
  std::mt19937 garbage;
};

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local Warp* warp = nullptr;
inline thread_local Block* block = nullptr;
inline dim3 block_dim;
inline dim3 grid_dim;
inline unsigned seed = 0;
constexpr std::size_t kConcurrentBlocks = 4;

// The block's instance of one __shared__ variable of type T (Tag: one per declaration),
// allocated by the first thread to reach the declaration and filled with garbage.
template <typename T, typename Tag>
T& shared(Tag) {
  static const char key = 0;
  std::lock_guard<std::mutex> lock(block->mutex);
  auto& slot = block->shared[&key];
  if (!slot) {
    slot = std::make_unique<unsigned char[]>(sizeof(T));
    for (std::size_t k = 0; k < sizeof(T); ++k)
      slot[k] = static_cast<unsigned char>(block->garbage());
  }
  return *reinterpret_cast<T*>(slot.get());
}

inline int lane() {
  const unsigned linear = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  return static_cast<int>(linear & 31u);
}

// Runs kernel(args...) over the grid: blocks in a seeded random order, kConcurrentBlocks at a
// time, the threads of each block concurrently.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_shape, Kernel kernel, Args... args) {
  block_dim = block_shape;
  grid_dim = grid;
  const unsigned threads = block_shape.x * block_shape.y * block_shape.z;
  const std::size_t blocks = static_cast<std::size_t>(grid.x) * grid.y * grid.z;
  std::vector<std::size_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(seed++);
  std::shuffle(order.begin(), order.end(), rng);
  for (std::size_t first = 0; first < blocks; first += kConcurrentBlocks) {
    const std::size_t last = std::min(blocks, first + kConcurrentBlocks);
    std::vector<std::unique_ptr<Block>> running;
    std::vector<std::thread> pool;
    pool.reserve(threads * (last - first));
    for (std::size_t k = first; k < last; ++k) {
      const std::size_t b = order[k];
      const dim3 bid(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (static_cast<std::size_t>(grid.x) * grid.y)));
      running.push_back(std::make_unique<Block>(threads, static_cast<unsigned>(rng())));
      Block* here = running.back().get();
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, here, bid, t] {
          thread_idx = dim3(t % block_shape.x, t / block_shape.x % block_shape.y,
                            t / (block_shape.x * block_shape.y));
          block_idx = bid;
          block = here;
          warp = here->warps[t / 32].get();
          kernel(args...);
          // A thread that returns early leaves the block barrier (as an exited CUDA thread does).
          here->barrier.arrive_and_drop();
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One instance per block, garbage until written (the lambda's type makes each declaration
// its own variable).
#define NCFAST_SHARED(type, name, dims) type(&name) dims = emu::shared<type dims>([] {})
#define NCFAST_LAUNCH(kernel, grid, block, stream, ...) \
  emu::launch(dim3(grid), dim3(block), kernel, __VA_ARGS__)

// The runtime calls of the launch code: errors come from the injection points above.
inline cudaError_t cudaGetLastError() { return std::exchange(emu::pending_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return emu::pending_error; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, T*) {
  if (emu::fail_load != cudaSuccess) emu::pending_error = emu::fail_load;  // as the runtime does
  return emu::fail_load;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaErrorUnsupportedPtxVersion ? "the provided PTX was compiled with an "
                                                 "unsupported toolchain."
                                               : "emulated CUDA error";
}

inline void __syncthreads() { emu::block->barrier.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldcg(const T* p) {
  return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v &&
         !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

inline int __popc(unsigned v) { return std::popcount(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }

// Warp collectives: every lane of the warp must call them together (full mask only).
template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= 8);
  emu::Warp* w = emu::warp;
  const int lane = emu::lane();
  std::memcpy(w->slots[lane], &value, sizeof(T));
  w->barrier.arrive_and_wait();
  T out = value;
  if (lane + offset < 32) std::memcpy(&out, w->slots[lane + offset], sizeof(T));
  w->barrier.arrive_and_wait();
  return out;
}

inline unsigned __ballot_sync(unsigned /*mask*/, bool predicate) {
  emu::Warp* w = emu::warp;
  const int lane = emu::lane();
  w->slots[lane][0] = predicate ? 1 : 0;
  w->barrier.arrive_and_wait();
  unsigned ballot = 0;
  for (int k = 0; k < 32; ++k) ballot |= static_cast<unsigned>(w->slots[k][0] != 0) << k;
  w->barrier.arrive_and_wait();
  return ballot;
}

inline bool __all_sync(unsigned /*mask*/, bool predicate) {
  emu::Warp* w = emu::warp;
  const int lane = emu::lane();
  w->slots[lane][0] = predicate ? 1 : 0;
  w->barrier.arrive_and_wait();
  bool all = true;
  for (int k = 0; k < 32; ++k) all = all && w->slots[k][0] != 0;
  w->barrier.arrive_and_wait();
  return all;
}
