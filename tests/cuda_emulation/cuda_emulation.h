// A CPU emulation of the parts of the CUDA execution model that the kernels of csrc/cuda/ use,
// so that the kernels' own source runs in the tests on machines without a GPU (not part of the
// extension; built by tests/test_native_cuda_emulation.py).
//
// Every thread of a block is a std::thread; __syncthreads is a std::barrier over the block and
// the warp collectives exchange values through a per-warp slot array and barrier. Blocks run
// one at a time, in a shuffled order (seeded), so __shared__ can be a function-local static.
// What it cannot show: races between blocks running at once, memory-model subtleties,
// performance.
#pragma once

#define NCFAST_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

using std::isnan;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated launch failed"; }

namespace emu {

struct Warp {
  std::barrier<> barrier{32};
  alignas(8) unsigned char slots[32][8];
};

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local Warp* warp = nullptr;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline dim3 block_dim;
inline dim3 grid_dim;
inline unsigned seed = 0;

inline int lane() {
  const unsigned linear = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  return static_cast<int>(linear & 31u);
}

// Runs kernel(args...) over the grid: blocks one after another in a seeded random order, the
// threads of a block concurrently.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  block_dim = block;
  grid_dim = grid;
  const unsigned threads = block.x * block.y * block.z;
  const std::size_t blocks = static_cast<std::size_t>(grid.x) * grid.y * grid.z;
  std::vector<std::size_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(seed++);
  std::shuffle(order.begin(), order.end(), rng);
  for (const std::size_t b : order) {
    const dim3 bid(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / (static_cast<std::size_t>(grid.x) * grid.y)));
    std::barrier<> bar(threads);
    std::vector<std::unique_ptr<Warp>> warps((threads + 31) / 32);
    for (auto& w : warps) w = std::make_unique<Warp>();
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
        block_idx = bid;
        warp = warps[t / 32].get();
        block_barrier = &bar;
        kernel(args...);
        // A thread that returns early leaves the block barrier (as an exited CUDA thread does).
        bar.arrive_and_drop();
      });
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
#define __shared__ static
#define NCFAST_LAUNCH(kernel, grid, block, stream, ...) \
  emu::launch(dim3(grid), dim3(block), kernel, __VA_ARGS__)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
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
