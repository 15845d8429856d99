// The fused statistics update on CUDA: three kernels per batch and no host synchronisation
// (classify_rows_kernel, rank_rows_kernel, center_rows_kernel; ops_cuda.cpp adds the Gram
// GEMM), and the mirror of the Gram panels. Templates are instantiated for the four feature dtypes
// only; labels of any integer dtype are read through a run-time switch (common.h).
#include "device_common.cuh"

namespace ncfast {
namespace cuda {
namespace detail {

constexpr int kClassifyThreads = 128;  // 4 warps, one row each
constexpr int kClassifyWarps = kClassifyThreads / 32;
constexpr int kRowsPerWarpCenter = kRowsPerTile / kWarps;
constexpr int kColsPerBlockCenter = 32;  // one column per lane

__device__ __forceinline__ int rows_in_tile(int64_t batch, int64_t row0) {
  return batch - row0 < kRowsPerTile ? static_cast<int>(batch - row0) : kRowsPerTile;
}

// Kernel 1 of the update: one warp per row, four rows per block, so that even a batch of 1024
// rows spreads over 256 blocks (every SM). Validates the label and the row's finiteness,
// records the row's class, counts rows per class and, for a class with no sample before this
// batch, its first valid row. The first row of a class to arrive (its count's atomicAdd
// returned 0) appends the class to the list of the batch's classes: later kernels walk that
// list, never all C classes.
template <typename T>
__global__ void __launch_bounds__(kClassifyThreads) classify_rows_kernel(UpdateParams q) {
  // 32-bit block counters (at most kClassifyWarps rows each), widened once per block.
  NCFAST_SHARED(unsigned int, bad, [2]);
  const int t = threadIdx.x;
  if (t < 2) bad[t] = 0;
  __syncthreads();
  const int lane = t & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kClassifyWarps + (t >> 5);
  if (i < q.batch) {  // warp-uniform
    const int64_t label = load_label(q.labels, i * q.label_stride, q.label_kind);
    int cls = -1;
    if (label >= 0 && label < q.classes) {  // warp-uniform
      const T* row = static_cast<const T*>(q.features) + i * q.row_stride;
      bool finite = true;
      for (int64_t j = lane; j < q.dim; j += 32) finite &= is_finite_value(row[j * q.col_stride]);
      finite = __all_sync(kFullMask, finite);
      if (finite) {
        cls = static_cast<int>(label);
        if (lane == 0) {
          if (atomicAdd(q.batch_counts + label, 1) == 0) {
            q.batch_classes[atomicAdd(q.num_batch_classes, 1u)] = cls;
          }
          // counts is written by kernel 2 only, after this kernel.
          if (q.counts[label] == 0)
            atomicMax(q.first_row_inv + label, static_cast<int>(q.batch - i));
        }
      } else if (lane == 0) {
        atomicAdd(&bad[1], 1u);
      }
    } else if (lane == 0) {
      atomicAdd(&bad[0], 1u);
    }
    if (lane == 0) q.row_class[i] = cls;
  }
  __syncthreads();
  if (t == 0) {
    using u64 = unsigned long long;
    if (bad[0] != 0) atomicAdd(reinterpret_cast<u64*>(q.invalid), static_cast<u64>(bad[0]));
    if (bad[1] != 0) atomicAdd(reinterpret_cast<u64*>(q.invalid + 1), static_cast<u64>(bad[1]));
  }
}

// Kernel 2 of the update: one block of kRowsPerTile threads per row tile ranks the tile's rows
// by class (once: every column tile of kernel 3 walks that order); then all blocks together
// walk the batch's classes (kernel 1's list, each class once), flag those first seen and add
// the batch counts to `counts`.
__global__ void __launch_bounds__(kRowsPerTile) rank_rows_kernel(UpdateParams q) {
  NCFAST_SHARED(int, tile_class, [kRowsPerTile]);
  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerTile;
  const int rows_here = rows_in_tile(q.batch, row0);
  if (t < rows_here) tile_class[t] = q.row_class[row0 + t];
  __syncthreads();
  if (t < rows_here) {
    // Stable rank by class, invalid rows (-1) last.
    const unsigned key = static_cast<unsigned>(tile_class[t]);
    int rank = 0;
    for (int u = 0; u < rows_here; ++u) {
      const unsigned other = static_cast<unsigned>(tile_class[u]);
      rank += (other < key) || (other == key && u < t);
    }
    q.tile_order[row0 + rank] = t;
  }
  const int present = static_cast<int>(*q.num_batch_classes);
  for (int k = blockIdx.x * kRowsPerTile + t; k < present; k += gridDim.x * kRowsPerTile) {
    const int c = q.batch_classes[k];
    const int64_t before = q.counts[c];
    q.is_new[c] = before == 0;
    q.counts[c] = before + q.batch_counts[c];
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

// Kernel 3 of the update: a tile of 128 rows × 32 columns per block. Each warp takes 16
// consecutive rows of the tile's class order (kernel 2) with one column per lane: it loads all
// 16 values first (16 loads in flight, not one), then writes z = h − s_y (float64) and sums z
// over runs of one class, so the class sums cost one atomic per run instead of one per element.
template <typename T>
__global__ void __launch_bounds__(kThreads) center_rows_kernel(UpdateParams q) {
  NCFAST_SHARED(int, cls, [kRowsPerTile]);
  NCFAST_SHARED(int, order, [kRowsPerTile]);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerTile;
  const int rows_here = rows_in_tile(q.batch, row0);
  const int t = threadIdx.x;
  if (t < rows_here) {
    cls[t] = q.row_class[row0 + t];
    order[t] = q.tile_order[row0 + t];
  }
  __syncthreads();
  const int warp = t >> 5;
  const int lane = t & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kColsPerBlockCenter + lane;
  const bool col_ok = j < q.dim;
  const T* x = static_cast<const T*>(q.features);
  const int first = warp * kRowsPerWarpCenter;
  const int rows = rows_here - first < kRowsPerWarpCenter ? rows_here - first : kRowsPerWarpCenter;
  int slot[kRowsPerWarpCenter];
  double h[kRowsPerWarpCenter];
#pragma unroll
  for (int k = 0; k < kRowsPerWarpCenter; ++k) {
    slot[k] = k < rows ? order[first + k] : 0;
    const bool load = k < rows && col_ok && cls[slot[k]] >= 0;
    h[k] = load ? to_double(x[(row0 + slot[k]) * q.row_stride + j * q.col_stride]) : 0.0;
  }
  int current = -1;
  double acc = 0.0;
  double s = 0.0;
#pragma unroll
  for (int k = 0; k < kRowsPerWarpCenter; ++k) {
    if (k >= rows) break;  // warp-uniform
    const int c = cls[slot[k]];
    if (c != current) {
      if (current >= 0 && col_ok)
        atomicAdd(q.sums + static_cast<int64_t>(current) * q.dim + j, acc);
      current = c;
      acc = 0.0;
      if (c >= 0 && col_ok) s = shift_of(q, x, c, j);
    }
    if (!col_ok) continue;
    // Invalid rows are zero: they add nothing to the Gram product.
    const double v = c < 0 ? 0.0 : h[k] - s;
    q.centered[(row0 + slot[k]) * q.dim + j] = v;
    acc += v;
  }
  if (current >= 0 && col_ok) atomicAdd(q.sums + static_cast<int64_t>(current) * q.dim + j, acc);
  // The first-seen classes' shifts, spread over the blocks of every row tile (entry k of the
  // list to row tile k / kWarps mod the tiles): no block reads the shift of a first-seen class,
  // so this races with nothing.
  if (col_ok) {
    const int present = static_cast<int>(*q.num_batch_classes);
    for (int k = blockIdx.x * kWarps + warp; k < present; k += gridDim.x * kWarps) {
      const int c = q.batch_classes[k];
      if (q.is_new[c]) q.shift[static_cast<int64_t>(c) * q.dim + j] = shift_of(q, x, c, j);
    }
  }
}

// Copies the strict upper triangle onto the lower one, 32×32 tiles through shared memory.
__global__ void mirror_kernel(double* m, int64_t p) {
  NCFAST_SHARED(double, tile, [32][33]);
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
void launch_update_typed(const UpdateParams& q, cudaStream_t stream) {
  // Before any launch: a kernel that cannot load fails here, with the state untouched.
  ensure_loadable("update_stats_", classify_rows_kernel<T>, rank_rows_kernel, center_rows_kernel<T>,
                  mirror_kernel);
  const unsigned row_tiles = static_cast<unsigned>((q.batch + kRowsPerTile - 1) / kRowsPerTile);
  const unsigned row_groups =
      static_cast<unsigned>((q.batch + kClassifyWarps - 1) / kClassifyWarps);
  launch_checked("classify_rows_kernel", [&] {
    NCFAST_LAUNCH(classify_rows_kernel<T>, row_groups, kClassifyThreads, stream, q);
  });
  launch_checked("rank_rows_kernel",
                 [&] { NCFAST_LAUNCH(rank_rows_kernel, row_tiles, kRowsPerTile, stream, q); });
  if (q.dim == 0) return;
  const dim3 grid(row_tiles,
                  static_cast<unsigned>((q.dim + kColsPerBlockCenter - 1) / kColsPerBlockCenter));
  launch_checked("center_rows_kernel",
                 [&] { NCFAST_LAUNCH(center_rows_kernel<T>, grid, kThreads, stream, q); });
}

}  // namespace detail

void launch_update_stats(const UpdateParams& params, int feature_kind, cudaStream_t stream) {
  if (params.batch == 0) return;
  switch (feature_kind) {
    case kF16:
      detail::launch_update_typed<c10::Half>(params, stream);
      break;
    case kBF16:
      detail::launch_update_typed<c10::BFloat16>(params, stream);
      break;
    case kF32:
      detail::launch_update_typed<float>(params, stream);
      break;
    default:
      detail::launch_update_typed<double>(params, stream);
      break;
  }
}

void launch_mirror_upper_to_lower(double* matrix, int64_t p, cudaStream_t stream) {
  if (p < 2) return;
  const unsigned tiles = static_cast<unsigned>((p + 31) / 32);
  detail::launch_checked("mirror_kernel", [&] {
    NCFAST_LAUNCH(detail::mirror_kernel, dim3(tiles, tiles), dim3(32, 8), stream, matrix, p);
  });
}

}  // namespace cuda
}  // namespace ncfast
