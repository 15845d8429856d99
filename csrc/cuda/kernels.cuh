// CUDA kernels of ncfast and their launchers: the fused statistics update (two kernels per
// batch, no host synchronisation), the Gram mirror, and the two halves of NC4 around a cuBLAS
// GEMM. Compiled by nvcc through kernels.cu, and for the tests on the CPU through
// csrc/emulation/cuda_emulator.cpp, which defines NCFAST_CUDA_EMULATION and emulates the CUDA
// execution model (so the logic of this very source is tested without a GPU).
//
// Templates are instantiated for the four feature dtypes only; labels of any integer dtype are
// read through a run-time switch (common.h), not a template parameter.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifndef NCFAST_CUDA_EMULATION
#include <cuda_runtime.h>
#define NCFAST_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

#include <algorithm>
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
constexpr int kRowsPerBlockClassify = 64;  // 8 rows per warp
constexpr int kRowsPerBlockCentre = 128;   // rows of one tile, sorted by class in the block
constexpr int kRowsPerWarpCentre = kRowsPerBlockCentre / kWarps;
constexpr int kColsPerBlockCentre = 32;  // one column per lane

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

// Kernel 1 of the update: one warp per row. Validates the label and the row's finiteness,
// records the row's class, counts rows per class and, for a class not seen before, its first
// valid row. The last block to finish turns the batch counts into the first-seen flags and
// adds them to `counts`: no second launch and no host round trip.
template <typename T>
__global__ void __launch_bounds__(kThreads) classify_rows_kernel(UpdateParams q) {
  __shared__ unsigned long long bad[2];
  __shared__ bool is_last;
  if (threadIdx.x < 2) bad[threadIdx.x] = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const T* x = static_cast<const T*>(q.features);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlockClassify;
  for (int r = warp; r < kRowsPerBlockClassify; r += kWarps) {
    const int64_t i = row0 + r;
    if (i >= q.batch) break;  // warp-uniform
    const int64_t label = load_label(q.labels, i * q.label_stride, q.label_kind);
    int cls = -1;
    if (label >= 0 && label < q.classes) {  // warp-uniform
      const T* row = x + i * q.row_stride;
      bool finite = true;
      for (int64_t j = lane; j < q.dim; j += 32) finite &= is_finite_value(row[j * q.col_stride]);
      finite = __all_sync(kFullMask, finite);
      if (finite) {
        cls = static_cast<int>(label);
        if (lane == 0) {
          atomicAdd(q.batch_counts + label, 1);
          // counts is only written by the last block, after every block has read it.
          if (q.counts[label] == 0)
            atomicMax(q.first_row_inv + label, static_cast<int>(q.batch - i));
        }
      } else if (lane == 0) {
        atomicAdd(&bad[1], 1ull);
      }
    } else if (lane == 0) {
      atomicAdd(&bad[0], 1ull);
    }
    if (lane == 0) q.row_class[i] = cls;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (bad[0] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(q.invalid), bad[0]);
    if (bad[1] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(q.invalid + 1), bad[1]);
  }
  // Publish this block's writes before taking a ticket (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(q.ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int64_t c = threadIdx.x; c < q.classes; c += blockDim.x) {
    const int n = __ldcg(q.batch_counts + c);
    const int64_t before = q.counts[c];
    q.is_new[c] = before == 0 && n > 0;
    q.counts[c] = before + n;
  }
}

// The shift of class c for column j: stored, or (first seen in this batch) its first sample.
template <typename T>
__device__ __forceinline__ double shift_of(const UpdateParams& q, const T* x, int c, int64_t j) {
  if (q.is_new[c]) {
    const int64_t first = q.batch - q.first_row_inv[c];
    return to_double(x[first * q.row_stride + j * q.col_stride]);
  }
  return q.shift[static_cast<int64_t>(c) * q.dim + j];
}

// Kernel 2 of the update: a tile of 128 rows × 32 columns per block. The tile's rows are
// ranked by class in shared memory (stable), then each warp walks 16 consecutive rows of that
// order with one column per lane: it writes z = h − s_y (float64) and sums z over runs of one
// class, so the class sums cost one atomic per run instead of one per element.
template <typename T>
__global__ void __launch_bounds__(kThreads) centre_rows_kernel(UpdateParams q) {
  __shared__ int cls[kRowsPerBlockCentre];
  __shared__ int order[kRowsPerBlockCentre];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlockCentre;
  const int t = threadIdx.x;
  if (t < kRowsPerBlockCentre) {
    const int64_t i = row0 + t;
    cls[t] = i < q.batch ? q.row_class[i] : -2;  // -2: past the end of the batch
  }
  __syncthreads();
  if (t < kRowsPerBlockCentre) {
    // Invalid and past-the-end rows sort last (past-the-end after invalid: larger index).
    const unsigned key = cls[t] < 0 ? 0xffffffffu : static_cast<unsigned>(cls[t]);
    int rank = 0;
    for (int u = 0; u < kRowsPerBlockCentre; ++u) {
      const unsigned other = cls[u] < 0 ? 0xffffffffu : static_cast<unsigned>(cls[u]);
      rank += (other < key) || (other == key && u < t);
    }
    order[rank] = t;
  }
  __syncthreads();
  const int warp = t >> 5;
  const int lane = t & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kColsPerBlockCentre + lane;
  const bool col_ok = j < q.dim;
  const T* x = static_cast<const T*>(q.features);
  int current = -1;
  double acc = 0.0;
  double s = 0.0;
  for (int k = 0; k < kRowsPerWarpCentre; ++k) {
    const int slot = order[warp * kRowsPerWarpCentre + k];
    const int c = cls[slot];
    if (c == -2) break;
    if (c != current) {
      if (current >= 0 && col_ok) {
        atomicAdd(q.sums + static_cast<int64_t>(current) * q.dim + j, acc);
      }
      current = c;
      acc = 0.0;
      if (c >= 0 && col_ok) s = shift_of(q, x, c, j);
    }
    if (!col_ok) continue;
    const int64_t i = row0 + slot;
    double* z = q.centred + i * q.dim + j;
    if (c < 0) {
      *z = 0.0;  // invalid rows add nothing to the Gram product
      continue;
    }
    const double v = to_double(x[i * q.row_stride + j * q.col_stride]) - s;
    *z = v;
    acc += v;
  }
  if (current >= 0 && col_ok) atomicAdd(q.sums + static_cast<int64_t>(current) * q.dim + j, acc);
  // Blocks of the first row tile store the first-seen shifts of their columns (no block reads
  // shift for a first-seen class, so this races with nothing).
  if (blockIdx.x == 0 && col_ok) {
    for (int64_t c = warp; c < q.classes; c += kWarps) {
      if (q.is_new[c]) q.shift[c * q.dim + j] = shift_of(q, x, static_cast<int>(c), j);
    }
  }
}

// Copies the strict upper triangle onto the lower one, 32×32 tiles through shared memory.
__global__ void mirror_kernel(double* m, int64_t p) {
  __shared__ double tile[32][33];
  const int64_t bi = blockIdx.y;  // destination tile row (lower triangle: bi >= bj)
  const int64_t bj = blockIdx.x;
  if (bj > bi) return;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  for (int k = ty; k < 32; k += blockDim.y) {
    const int64_t r = bj * 32 + k;
    const int64_t col = bi * 32 + tx;
    if (r < p && col < p) tile[k][tx] = m[r * p + col];
  }
  __syncthreads();
  for (int k = ty; k < 32; k += blockDim.y) {
    const int64_t r = bi * 32 + k;
    const int64_t col = bj * 32 + tx;
    if (r < p && col < r) m[r * p + col] = tile[tx][k];
  }
}

template <typename T>
__global__ void ncc_centre_kernel(const T* x, int64_t row_stride, int64_t col_stride,
                                  const bool* valid, int64_t valid_stride, const double* centre,
                                  int64_t batch, int64_t dim, double* out) {
  const int64_t total = batch * dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / dim;
    const int64_t j = idx - i * dim;
    out[idx] =
        valid[i * valid_stride] ? to_double(x[i * row_stride + j * col_stride]) - centre[j] : 0.0;
  }
}

// torch.argmin/argmax semantics: NaN is the extreme value, ties go to the lowest index.
__device__ __forceinline__ bool takes_min(double v, int64_t iv, double best, int64_t ib) {
  const bool nv = isnan(v), nb = isnan(best);
  if (nv != nb) return nv;
  if (nv || v == best) return iv < ib;
  return v < best;
}
__device__ __forceinline__ bool takes_max(double v, int64_t iv, double best, int64_t ib) {
  const bool nv = isnan(v), nb = isnan(best);
  if (nv != nb) return nv;
  if (nv || v == best) return iv < ib;
  return v > best;
}

__global__ void __launch_bounds__(kThreads)
    ncc_count_kernel(const double* near, const double* logits, const double* sq_norms,
                     const double* bias, const bool* present, const bool* valid,
                     int64_t valid_stride, int64_t batch, int64_t classes,
                     unsigned long long* count) {
  __shared__ unsigned long long block_count;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const double inf = __longlong_as_double(0x7ff0000000000000ll);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < batch;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    if (!valid[i * valid_stride]) continue;  // warp-uniform
    const double* sn = near + i * classes;
    const double* sl = logits + i * classes;
    double best_d = inf, best_l = -inf;
    int64_t arg_d = INT64_MAX, arg_l = INT64_MAX;
    for (int64_t k = lane; k < classes; k += 32) {
      const double d = present[k] ? sq_norms[k] - 2.0 * sn[k] : inf;
      if (takes_min(d, k, best_d, arg_d)) {
        best_d = d;
        arg_d = k;
      }
      const double l = sl[k] + bias[k];
      if (takes_max(l, k, best_l, arg_l)) {
        best_l = l;
        arg_l = k;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double od = __shfl_down_sync(kFullMask, best_d, offset);
      const int64_t oad = __shfl_down_sync(kFullMask, arg_d, offset);
      const double ol = __shfl_down_sync(kFullMask, best_l, offset);
      const int64_t oal = __shfl_down_sync(kFullMask, arg_l, offset);
      if (takes_min(od, oad, best_d, arg_d)) {
        best_d = od;
        arg_d = oad;
      }
      if (takes_max(ol, oal, best_l, arg_l)) {
        best_l = ol;
        arg_l = oal;
      }
    }
    if (lane == 0 && arg_d != arg_l) atomicAdd(&block_count, 1ull);
  }
  __syncthreads();
  if (threadIdx.x == 0 && block_count != 0) atomicAdd(count, block_count);
}

template <typename T>
void launch_update_typed(const UpdateParams& q, cudaStream_t stream) {
  const unsigned classify_blocks =
      static_cast<unsigned>((q.batch + kRowsPerBlockClassify - 1) / kRowsPerBlockClassify);
  NCFAST_LAUNCH(classify_rows_kernel<T>, classify_blocks, kThreads, stream, q);
  check_launch("classify_rows_kernel");
  if (q.dim == 0) return;
  const dim3 grid(static_cast<unsigned>((q.batch + kRowsPerBlockCentre - 1) / kRowsPerBlockCentre),
                  static_cast<unsigned>((q.dim + kColsPerBlockCentre - 1) / kColsPerBlockCentre));
  NCFAST_LAUNCH(centre_rows_kernel<T>, grid, kThreads, stream, q);
  check_launch("centre_rows_kernel");
}

template <typename T>
void launch_ncc_centre_typed(const void* x, int64_t row_stride, int64_t col_stride,
                             const bool* valid, int64_t valid_stride, const double* centre,
                             int64_t batch, int64_t dim, double* out, cudaStream_t stream) {
  const int64_t total = batch * dim;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65536));
  NCFAST_LAUNCH(ncc_centre_kernel<T>, blocks, kThreads, stream, static_cast<const T*>(x),
                row_stride, col_stride, valid, valid_stride, centre, batch, dim, out);
  check_launch("ncc_centre_kernel");
}

inline void launch_update_stats_impl(const UpdateParams& params, int feature_kind,
                                     cudaStream_t stream) {
  if (params.batch == 0) return;
  switch (feature_kind) {
    case kF16:
      launch_update_typed<c10::Half>(params, stream);
      break;
    case kBF16:
      launch_update_typed<c10::BFloat16>(params, stream);
      break;
    case kF32:
      launch_update_typed<float>(params, stream);
      break;
    default:
      launch_update_typed<double>(params, stream);
      break;
  }
}

inline void launch_mirror_upper_to_lower_impl(double* matrix, int64_t p, cudaStream_t stream) {
  if (p < 2) return;
  const unsigned tiles = static_cast<unsigned>((p + 31) / 32);
  NCFAST_LAUNCH(mirror_kernel, dim3(tiles, tiles), dim3(32, 8), stream, matrix, p);
  check_launch("mirror_kernel");
}

inline void launch_ncc_centre_impl(const void* features, int feature_kind, int64_t row_stride,
                                   int64_t col_stride, const bool* valid, int64_t valid_stride,
                                   const double* centre, int64_t batch, int64_t dim, double* out,
                                   cudaStream_t stream) {
  if (batch == 0 || dim == 0) return;
  switch (feature_kind) {
    case kF16:
      launch_ncc_centre_typed<c10::Half>(features, row_stride, col_stride, valid, valid_stride,
                                         centre, batch, dim, out, stream);
      break;
    case kBF16:
      launch_ncc_centre_typed<c10::BFloat16>(features, row_stride, col_stride, valid, valid_stride,
                                             centre, batch, dim, out, stream);
      break;
    case kF32:
      launch_ncc_centre_typed<float>(features, row_stride, col_stride, valid, valid_stride, centre,
                                     batch, dim, out, stream);
      break;
    default:
      launch_ncc_centre_typed<double>(features, row_stride, col_stride, valid, valid_stride, centre,
                                      batch, dim, out, stream);
      break;
  }
}

inline void launch_ncc_count_impl(const double* near, const double* logits, const double* sq_norms,
                                  const double* bias, const bool* present, const bool* valid,
                                  int64_t valid_stride, int64_t batch, int64_t classes,
                                  int64_t* count, cudaStream_t stream) {
  if (batch == 0 || classes == 0) return;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((batch + kWarps - 1) / kWarps, 4096));
  NCFAST_LAUNCH(ncc_count_kernel, blocks, kThreads, stream, near, logits, sq_norms, bias, present,
                valid, valid_stride, batch, classes, reinterpret_cast<unsigned long long*>(count));
  check_launch("ncc_count_kernel");
}

}  // namespace detail
}  // namespace cuda
}  // namespace ncfast
