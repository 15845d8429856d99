// The CUDA kernels of csrc/cuda/*.cu, compiled for the CPU against cuda_emulation.h and
// exposed with a C ABI for ctypes (tests/test_native_cuda_emulation.py). Test-only: never part
// of the extension. The build puts the repository root on the include path.
#include "cuda_emulation.h"
// clang-format off
#include "csrc/cuda/update_stats.cu"
#include "csrc/cuda/ncc_mismatch.cu"
// clang-format on

#include <exception>
#include <string>
#include <vector>

namespace {
std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}
}  // namespace

extern "C" {

const char* ncfast_emu_last_error() { return last_error.c_str(); }

void ncfast_emu_seed(unsigned seed) { emu::seed = seed; }

// Error injection: what loading a kernel reports from now on (0: success; 222: PTX the driver
// cannot JIT-compile), and an error left pending by an earlier, unrelated operation.
void ncfast_emu_fail_load(int error) { emu::fail_load = error; }
void ncfast_emu_set_pending_error(int error) { emu::pending_error = error; }

int64_t ncfast_emu_update_scratch_bytes(int64_t batch, int64_t dim, int64_t classes,
                                        int64_t* zeroed_bytes) {
  const ncfast::cuda::UpdateScratch layout(batch, classes);
  *zeroed_bytes = layout.zeroed_bytes;
  return layout.total_bytes;
}

// Byte offsets of the scratch fields of UpdateScratch::bind, in this order: num_batch_classes,
// batch_counts, first_row_inv, is_new, batch_classes, row_class, tile_order.
void ncfast_emu_update_scratch_offsets(int64_t batch, int64_t classes, int64_t* offsets) {
  const ncfast::cuda::UpdateScratch layout(batch, classes);
  std::vector<char> buffer(static_cast<std::size_t>(layout.total_bytes));
  ncfast::cuda::UpdateParams q{};
  q.batch = batch;
  q.classes = classes;
  ncfast::cuda::UpdateScratch::bind(q, buffer.data());
  const void* fields[] = {q.num_batch_classes, q.batch_counts, q.first_row_inv, q.is_new,
                          q.batch_classes,     q.row_class,    q.tile_order};
  for (int k = 0; k < 7; ++k) offsets[k] = static_cast<const char*>(fields[k]) - buffer.data();
}

// The kernel half of update_stats_cuda (csrc/cuda/ops_cuda.cpp); the caller zeroes the first
// zeroed_bytes of `scratch` and adds centeredᵀ·centered to the scatter itself.
int ncfast_emu_update_stats(const void* features, int feature_kind, int64_t row_stride,
                            int64_t col_stride, const void* labels, int label_kind,
                            int64_t label_stride, int64_t batch, int64_t dim, int64_t classes,
                            int64_t* counts, double* shift, double* sums, int64_t* invalid,
                            char* scratch, double* centered) {
  return guarded([&] {
    ncfast::cuda::UpdateParams q{};
    q.features = features;
    q.row_stride = row_stride;
    q.col_stride = col_stride;
    q.labels = labels;
    q.label_stride = label_stride;
    q.label_kind = label_kind;
    q.batch = batch;
    q.dim = dim;
    q.classes = classes;
    q.counts = counts;
    q.shift = shift;
    q.sums = sums;
    q.invalid = invalid;
    ncfast::cuda::UpdateScratch::bind(q, scratch);
    q.centered = centered;
    ncfast::cuda::launch_update_stats(q, feature_kind, nullptr);
  });
}

int ncfast_emu_mirror(double* matrix, int64_t p) {
  return guarded([&] { ncfast::cuda::launch_mirror_upper_to_lower(matrix, p, nullptr); });
}

int ncfast_emu_ncc_center(const void* features, int feature_kind, int64_t row_stride,
                          int64_t col_stride, const bool* valid, int64_t valid_stride,
                          const double* center, int64_t batch, int64_t dim, double* out) {
  return guarded([&] {
    ncfast::cuda::launch_ncc_center(features, feature_kind, row_stride, col_stride, valid,
                                    valid_stride, center, batch, dim, out, nullptr);
  });
}

int ncfast_emu_ncc_count(const double* near, const double* logits, const double* sq_norms,
                         const double* bias, const bool* present, const bool* valid,
                         int64_t valid_stride, int64_t batch, int64_t classes, int64_t* count) {
  return guarded([&] {
    ncfast::cuda::launch_ncc_count(near, logits, sq_norms, bias, present, valid, valid_stride,
                                   batch, classes, count, nullptr);
  });
}

}  // extern "C"
