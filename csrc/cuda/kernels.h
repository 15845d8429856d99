// Launchers of the CUDA kernels (update_stats.cu, ncc_mismatch.cu). Plain types only, so that
// the .cu files need no ATen headers (fast to compile) and the orchestration lives in
// ops_cuda.cpp.
#pragma once

#ifndef NCFAST_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace ncfast {
namespace cuda {

// The start of the error message when the driver cannot load ncfast's kernels on this GPU (no
// image for its architecture, or PTX it cannot JIT-compile): ncfast/backend/native.py falls
// back to the reference on it.
constexpr const char* kNoImage = "ncfast: no usable kernel image";

// One batch of the fused statistics update. Scratch arrays must be zeroed where noted.
// A class seen for the first time takes as its shift its first valid sample of the batch (a
// point within the class's spread, as exactness needs; the CPU kernel and the reference use
// the batch's class mean, which would need a [C, P] accumulator here).
struct UpdateParams {
  const void* features;  // [batch, dim], any strides, FeatureKind
  int64_t row_stride;
  int64_t col_stride;
  const void* labels;  // [batch], any stride, LabelKind
  int64_t label_stride;
  int label_kind;
  int64_t batch;
  int64_t dim;
  int64_t classes;
  // accumulator state (contiguous)
  int64_t* counts;   // [classes]
  double* shift;     // [classes, dim]
  double* sums;      // [classes, dim]
  int64_t* invalid;  // [2]
  // scratch
  unsigned int* num_batch_classes;  // zeroed: classes with a valid row in this batch
  int* batch_counts;                // [classes], zeroed
  int* first_row_inv;  // [classes], zeroed: batch − (first valid row of a first-seen class)
  int* is_new;         // [classes]: class first seen in this batch (set for the batch's classes)
  int* batch_classes;  // [classes]: the first *num_batch_classes entries, in arrival order
  int* row_class;      // [batch]: class, or -1 for an invalid row
  int* tile_order;     // [batch]: per row tile, the tile-local indices of its rows by class
  double* centered;    // [batch, dim] output: z_i = h_i − s_{y_i}, zero rows if invalid
};

// Rows of one tile: the second kernel ranks them by class, the third walks them in that order.
constexpr int kRowsPerTile = 128;

// The scratch of one update as one allocation of O(B + C) ints: num_batch_classes u32 | 4 bytes
// of padding | batch_counts i32[C] | first_row_inv i32[C], which one memset zeroes, then
// is_new i32[C] | batch_classes i32[C] | row_class i32[B] | tile_order i32[B]. Nothing of size
// [C, P].
struct UpdateScratch {
  int64_t zeroed_bytes;
  int64_t total_bytes;
  UpdateScratch(int64_t batch, int64_t classes)
      : zeroed_bytes(8 + 8 * classes), total_bytes(8 + 16 * classes + 8 * batch) {}
  // Points the scratch fields of `params` (batch and classes set) into `base` (8-byte aligned).
  static void bind(UpdateParams& params, char* base) {
    const int64_t c = params.classes;
    const int64_t b = params.batch;
    params.num_batch_classes = reinterpret_cast<unsigned int*>(base);
    params.batch_counts = reinterpret_cast<int*>(base + 8);
    params.first_row_inv = reinterpret_cast<int*>(base + 8 + 4 * c);
    params.is_new = reinterpret_cast<int*>(base + 8 + 8 * c);
    params.batch_classes = reinterpret_cast<int*>(base + 8 + 12 * c);
    params.row_class = reinterpret_cast<int*>(base + 8 + 16 * c);
    params.tile_order = reinterpret_cast<int*>(base + 8 + 16 * c + 4 * b);
  }
};

// Launches the three kernels of the update on `stream`; throws std::runtime_error on a launch
// failure (its message starts with kNoImage where the GPU cannot load the kernels: nothing has
// run then, and the caller may take another path).
void launch_update_stats(const UpdateParams& params, int feature_kind, cudaStream_t stream);

// m[i, j] = m[j, i] for i > j, m [p, p] row-major.
void launch_mirror_upper_to_lower(double* matrix, int64_t p, cudaStream_t stream);

// out[i, :] = valid[i] ? float64(x[i, :]) − center : 0, out [batch, dim] contiguous.
void launch_ncc_center(const void* features, int feature_kind, int64_t row_stride,
                       int64_t col_stride, const bool* valid, int64_t valid_stride,
                       const double* center, int64_t batch, int64_t dim, double* out,
                       cudaStream_t stream);

// *count += #{valid i : argmin_k (sq[k] − 2 near[i,k], absent k excluded) ≠
//                       argmax_k (logits[i, k] + bias[k])}, near and logits [batch, C].
void launch_ncc_count(const double* near, const double* logits, const double* sq_norms,
                      const double* bias, const bool* present, const bool* valid,
                      int64_t valid_stride, int64_t batch, int64_t classes, int64_t* count,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace ncfast
