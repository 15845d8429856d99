// NC4 on CUDA: the two kernels around the cuBLAS GEMMs of ncc_mismatch_count_cuda
// (ops_cuda.cpp): centering of a row block, then the argmin/argmax/compare/count sweep.
#include <algorithm>

#include "device_common.cuh"

namespace ncfast {
namespace cuda {
namespace detail {

// One warp per row (grid-stride over rows), one column per lane: no 64-bit division per
// element, the row's validity read once, and contiguous rows read coalesced.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ncc_center_kernel(const T* x, int64_t row_stride, int64_t col_stride, const bool* valid,
                      int64_t valid_stride, const double* center, int64_t batch, int64_t dim,
                      double* out) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < batch;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    const bool ok = valid[i * valid_stride];  // warp-uniform
    const T* row = x + i * row_stride;
    double* dst = out + i * dim;
    for (int64_t j = lane; j < dim; j += 32) {
      dst[j] = ok ? to_double(row[j * col_stride]) - center[j] : 0.0;
    }
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
  // 32-bit block counter (a block counts fewer than 2^32 rows: batch < 2^31), widened once.
  NCFAST_SHARED(unsigned int, block_count, );
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
    if (lane == 0 && arg_d != arg_l) atomicAdd(&block_count, 1u);
  }
  __syncthreads();
  if (threadIdx.x == 0 && block_count != 0) {
    atomicAdd(count, static_cast<unsigned long long>(block_count));
  }
}

template <typename T>
void launch_ncc_center_typed(const void* x, int64_t row_stride, int64_t col_stride,
                             const bool* valid, int64_t valid_stride, const double* center,
                             int64_t batch, int64_t dim, double* out, cudaStream_t stream) {
  ensure_loadable("ncc_mismatch_count", ncc_center_kernel<T>, ncc_count_kernel);
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((batch + kWarps - 1) / kWarps, 65536));
  launch_checked("ncc_center_kernel", [&] {
    NCFAST_LAUNCH(ncc_center_kernel<T>, blocks, kThreads, stream, static_cast<const T*>(x),
                  row_stride, col_stride, valid, valid_stride, center, batch, dim, out);
  });
}

}  // namespace detail

void launch_ncc_center(const void* features, int feature_kind, int64_t row_stride,
                       int64_t col_stride, const bool* valid, int64_t valid_stride,
                       const double* center, int64_t batch, int64_t dim, double* out,
                       cudaStream_t stream) {
  if (batch == 0 || dim == 0) return;
  switch (feature_kind) {
    case kF16:
      detail::launch_ncc_center_typed<c10::Half>(features, row_stride, col_stride, valid,
                                                 valid_stride, center, batch, dim, out, stream);
      break;
    case kBF16:
      detail::launch_ncc_center_typed<c10::BFloat16>(features, row_stride, col_stride, valid,
                                                     valid_stride, center, batch, dim, out, stream);
      break;
    case kF32:
      detail::launch_ncc_center_typed<float>(features, row_stride, col_stride, valid, valid_stride,
                                             center, batch, dim, out, stream);
      break;
    default:
      detail::launch_ncc_center_typed<double>(features, row_stride, col_stride, valid, valid_stride,
                                              center, batch, dim, out, stream);
      break;
  }
}

void launch_ncc_count(const double* near, const double* logits, const double* sq_norms,
                      const double* bias, const bool* present, const bool* valid,
                      int64_t valid_stride, int64_t batch, int64_t classes, int64_t* count,
                      cudaStream_t stream) {
  if (batch == 0 || classes == 0) return;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((batch + detail::kWarps - 1) / detail::kWarps, 4096));
  detail::launch_checked("ncc_count_kernel", [&] {
    NCFAST_LAUNCH(detail::ncc_count_kernel, blocks, detail::kThreads, stream, near, logits,
                  sq_norms, bias, present, valid, valid_stride, batch, classes,
                  reinterpret_cast<unsigned long long*>(count));
  });
}

}  // namespace cuda
}  // namespace ncfast
