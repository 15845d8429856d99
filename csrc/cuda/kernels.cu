// The CUDA kernels (kernels.cuh) compiled for the device, behind the launchers of kernels.h.
#include "kernels.cuh"

namespace ncfast {
namespace cuda {

void launch_update_stats(const UpdateParams& params, int feature_kind, cudaStream_t stream) {
  detail::launch_update_stats_impl(params, feature_kind, stream);
}

void launch_mirror_upper_to_lower(double* matrix, int64_t p, cudaStream_t stream) {
  detail::launch_mirror_upper_to_lower_impl(matrix, p, stream);
}

void launch_ncc_centre(const void* features, int feature_kind, int64_t row_stride,
                       int64_t col_stride, const bool* valid, int64_t valid_stride,
                       const double* centre, int64_t batch, int64_t dim, double* out,
                       cudaStream_t stream) {
  detail::launch_ncc_centre_impl(features, feature_kind, row_stride, col_stride, valid,
                                 valid_stride, centre, batch, dim, out, stream);
}

void launch_ncc_count(const double* near, const double* logits, const double* sq_norms,
                      const double* bias, const bool* present, const bool* valid,
                      int64_t valid_stride, int64_t batch, int64_t classes, int64_t* count,
                      cudaStream_t stream) {
  detail::launch_ncc_count_impl(near, logits, sq_norms, bias, present, valid, valid_stride, batch,
                                classes, count, stream);
}

}  // namespace cuda
}  // namespace ncfast
