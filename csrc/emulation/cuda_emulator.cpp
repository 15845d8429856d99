// The CUDA kernels of csrc/cuda/kernels.cuh, compiled for the CPU against cuda_emulation.h and
// exposed with a C ABI for ctypes (tests/test_native_cuda_emulation.py). Test-only: never part
// of the extension.
#include "cuda_emulation.h"
// clang-format off
#include "../cuda/kernels.cuh"
// clang-format on

#include <exception>
#include <string>

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

int64_t ncfast_emu_update_scratch_bytes(int64_t batch, int64_t dim, int64_t classes,
                                        int64_t* zeroed_bytes) {
  const ncfast::cuda::UpdateScratch layout(batch, classes);
  *zeroed_bytes = layout.zeroed_bytes;
  return layout.total_bytes;
}

// The kernel half of update_stats_cuda (csrc/cuda/ops_cuda.cpp); the caller zeroes the first
// zeroed_bytes of `scratch` and adds centredᵀ·centred to the scatter itself.
int ncfast_emu_update_stats(const void* features, int feature_kind, int64_t row_stride,
                            int64_t col_stride, const void* labels, int label_kind,
                            int64_t label_stride, int64_t batch, int64_t dim, int64_t classes,
                            int64_t* counts, double* shift, double* sums, int64_t* invalid,
                            char* scratch, double* centred) {
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
    q.centred = centred;
    ncfast::cuda::detail::launch_update_stats_impl(q, feature_kind, nullptr);
  });
}

int ncfast_emu_mirror(double* matrix, int64_t p) {
  return guarded(
      [&] { ncfast::cuda::detail::launch_mirror_upper_to_lower_impl(matrix, p, nullptr); });
}

int ncfast_emu_ncc_centre(const void* features, int feature_kind, int64_t row_stride,
                          int64_t col_stride, const bool* valid, int64_t valid_stride,
                          const double* centre, int64_t batch, int64_t dim, double* out) {
  return guarded([&] {
    ncfast::cuda::detail::launch_ncc_centre_impl(features, feature_kind, row_stride, col_stride,
                                                 valid, valid_stride, centre, batch, dim, out,
                                                 nullptr);
  });
}

int ncfast_emu_ncc_count(const double* near, const double* logits, const double* sq_norms,
                         const double* bias, const bool* present, const bool* valid,
                         int64_t valid_stride, int64_t batch, int64_t classes, int64_t* count) {
  return guarded([&] {
    ncfast::cuda::detail::launch_ncc_count_impl(near, logits, sq_norms, bias, present, valid,
                                                valid_stride, batch, classes, count, nullptr);
  });
}

}  // extern "C"
