// The fused statistics update on CUDA: two kernels per batch and no host synchronisation
// (classify_rows_kernel, then center_rows_kernel; ops_cuda.cpp adds the Gram GEMM), and the
// mirror of the Gram panels. Templates are instantiated for the four feature dtypes only;
// labels of any integer dtype are read through a run-time switch (common.h).
#include "device_common.cuh"

namespace ncfast {
namespace cuda {
namespace detail {

constexpr int kClassifyThreads = 512;  // 16 warps, 8 rows each: one row tile per block
constexpr int kClassifyWarps = kClassifyThreads / 32;
constexpr int kRowsPerWarpCenter = kRowsPerTile / kWarps;
constexpr int kColsPerBlockCenter = 32;  // one column per lane

__device__ __forceinline__ int rows_in_tile(int64_t batch, int64_t row0) {
  return batch - row0 < kRowsPerTile ? static_cast<int>(batch - row0) : kRowsPerTile;
}

// Kernel 1 of the update: one block per row tile, one warp per row. Validates the label and
// the row's finiteness, records the row's class, counts rows per class and, for a class not
// seen before, its first valid row; then ranks the tile's rows by class (once per row tile:
// every column tile of kernel 2 reads that order). The last block to finish turns the batch
// counts into the first-seen flags and the compact list of first-seen classes, and adds the
// counts to `counts`: no second launch and no host round trip.
template <typename T>
__global__ void __launch_bounds__(kClassifyThreads) classify_rows_kernel(UpdateParams q) {
  // 32-bit block counters (at most kRowsPerTile rows each), widened once per block.
  __shared__ unsigned int bad[2];
  __shared__ int tile_class[kRowsPerTile];
  __shared__ unsigned int warp_new[kClassifyWarps];
  __shared__ unsigned int new_before;
  __shared__ bool is_last;
  const int t = threadIdx.x;
  if (t < 2) bad[t] = 0;
  __syncthreads();
  const int warp = t >> 5;
  const int lane = t & 31;
  const T* x = static_cast<const T*>(q.features);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerTile;
  const int rows_here = rows_in_tile(q.batch, row0);
  for (int r = warp; r < rows_here; r += kClassifyWarps) {
    const int64_t i = row0 + r;
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
        atomicAdd(&bad[1], 1u);
      }
    } else if (lane == 0) {
      atomicAdd(&bad[0], 1u);
    }
    if (lane == 0) {
      q.row_class[i] = cls;
      tile_class[r] = cls;
    }
  }
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
  if (t == 0) {
    using u64 = unsigned long long;
    if (bad[0] != 0) atomicAdd(reinterpret_cast<u64*>(q.invalid), static_cast<u64>(bad[0]));
    if (bad[1] != 0) atomicAdd(reinterpret_cast<u64*>(q.invalid + 1), static_cast<u64>(bad[1]));
  }
  // Publish this block's writes before taking a ticket (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (t == 0) {
    is_last = atomicAdd(q.ticket, 1u) == gridDim.x - 1;
    new_before = 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Chunks of one class per thread; the first-seen classes of a chunk are appended to the
  // compact list in class order (ballot within each warp, warp offsets in shared memory).
  for (int64_t c0 = 0; c0 < q.classes; c0 += kClassifyThreads) {  // block-uniform
    const int64_t c = c0 + t;
    bool fresh = false;
    if (c < q.classes) {
      const int n = __ldcg(q.batch_counts + c);
      const int64_t before = q.counts[c];
      fresh = before == 0 && n > 0;
      q.is_new[c] = fresh;
      q.counts[c] = before + n;
    }
    const unsigned ballot = __ballot_sync(kFullMask, fresh);
    if (lane == 0) warp_new[warp] = __popc(ballot);
    __syncthreads();
    if (fresh) {
      unsigned slot = new_before + __popc(ballot & ((1u << lane) - 1u));
      for (int w = 0; w < warp; ++w) slot += warp_new[w];
      q.new_classes[slot] = static_cast<int>(c);
    }
    __syncthreads();
    if (t == 0) {
      for (int w = 0; w < kClassifyWarps; ++w) new_before += warp_new[w];
    }
    __syncthreads();
  }
  if (t == 0) *q.num_new = new_before;
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

// Kernel 2 of the update: a tile of 128 rows × 32 columns per block. Each warp walks 16
// consecutive rows of the tile's class order (kernel 1) with one column per lane: it writes
// z = h − s_y (float64) and sums z over runs of one class, so the class sums cost one atomic
// per run instead of one per element.
template <typename T>
__global__ void __launch_bounds__(kThreads) center_rows_kernel(UpdateParams q) {
  __shared__ int cls[kRowsPerTile];
  __shared__ int order[kRowsPerTile];
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
  int current = -1;
  double acc = 0.0;
  double s = 0.0;
  for (int k = 0; k < kRowsPerWarpCenter; ++k) {
    const int position = warp * kRowsPerWarpCenter + k;
    if (position >= rows_here) break;  // warp-uniform
    const int slot = order[position];
    const int c = cls[slot];
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
    double* z = q.centered + i * q.dim + j;
    if (c < 0) {
      *z = 0.0;  // invalid rows add nothing to the Gram product
      continue;
    }
    const double v = to_double(x[i * q.row_stride + j * q.col_stride]) - s;
    *z = v;
    acc += v;
  }
  if (current >= 0 && col_ok) atomicAdd(q.sums + static_cast<int64_t>(current) * q.dim + j, acc);
  // Blocks of the first row tile store the first-seen shifts of their columns, looping over
  // the compact list of kernel 1 (no block reads shift for a first-seen class, so this races
  // with nothing).
  if (blockIdx.x == 0 && col_ok) {
    const int num_new = static_cast<int>(*q.num_new);
    for (int k = warp; k < num_new; k += kWarps) {
      const int c = q.new_classes[k];
      q.shift[static_cast<int64_t>(c) * q.dim + j] = shift_of(q, x, c, j);
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
void launch_update_typed(const UpdateParams& q, cudaStream_t stream) {
  const unsigned row_tiles = static_cast<unsigned>((q.batch + kRowsPerTile - 1) / kRowsPerTile);
  NCFAST_LAUNCH(classify_rows_kernel<T>, row_tiles, kClassifyThreads, stream, q);
  check_launch("classify_rows_kernel");
  if (q.dim == 0) return;
  const dim3 grid(row_tiles,
                  static_cast<unsigned>((q.dim + kColsPerBlockCenter - 1) / kColsPerBlockCenter));
  NCFAST_LAUNCH(center_rows_kernel<T>, grid, kThreads, stream, q);
  check_launch("center_rows_kernel");
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
  NCFAST_LAUNCH(detail::mirror_kernel, dim3(tiles, tiles), dim3(32, 8), stream, matrix, p);
  detail::check_launch("mirror_kernel");
}

}  // namespace cuda
}  // namespace ncfast
