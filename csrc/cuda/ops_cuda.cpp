// CUDA implementations of the ops: scratch allocation, kernel launches (update_stats.cu,
// ncc_mismatch.cu) and the cuBLAS GEMMs (through ATen), all on the current stream and without
// host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>

#include "../ops.h"
#include "kernels.h"

namespace ncfast {

bool compiled_with_cuda() { return true; }
int compiled_cuda_version() { return CUDART_VERSION; }

namespace {

// The fewest rows for which the Gram product goes in upper-triangle panels on CUDA. Four
// panels save 3/8 of the flops, but split the GEMM into narrower ones and add the mirror's pass
// over P² doubles and three launches. They pay once each panel (height P/4) is wide enough to
// fill the GPU, P ≥ 2048, and the product is large, B·P² ≥ 2^32 (8.6 GFLOP, ~0.15 ms of FP64
// tensor-core GEMM on an H100, against ~0.05 ms for the mirror at P = 4096): from B = 256 at
// P = 4096 and B = 1024 at P = 2048; never at P < 2048, where the narrow panels lose more than
// the flops saved.
int64_t cuda_panel_min_rows(int64_t p) {
  if (p < 2048) return std::numeric_limits<int64_t>::max();
  return ((int64_t{1} << 32) + p * p - 1) / (p * p);
}

void mirror_upper_to_lower_cuda(at::Tensor& matrix) {
  cuda::launch_mirror_upper_to_lower(matrix.data_ptr<double>(), matrix.size(0),
                                     c10::cuda::getCurrentCUDAStream());
}

void update_stats_cuda(const at::Tensor& features, const at::Tensor& labels, at::Tensor& counts,
                       at::Tensor& shift, at::Tensor& sums, at::Tensor& scatter,
                       at::Tensor& invalid, bool fast) {
  check_update_args(features, labels, counts, shift, sums, scatter, invalid);
  const int64_t b = features.size(0);
  if (b == 0) return;
  // The class sums are float64 atomicAdds in whatever order the blocks run. Under
  // torch.use_deterministic_algorithms(True) this raises torch's own error (a warning with
  // warn_only=True); ncfast.ops then takes the reference update, whose index_add_ torch makes
  // deterministic.
  at::globalContext().alertNotDeterministic("ncfast::update_stats_ on CUDA (class sums)");
  const c10::cuda::CUDAGuard guard(features.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t c = counts.size(0);
  const int64_t p = features.size(1);

  const cuda::UpdateScratch layout(b, c);
  at::Tensor scratch = at::empty({layout.total_bytes}, features.options().dtype(at::kByte));
  char* base = static_cast<char*>(scratch.data_ptr());
  C10_CUDA_CHECK(cudaMemsetAsync(base, 0, static_cast<size_t>(layout.zeroed_bytes), stream));
  at::Tensor centered = at::empty({b, p}, shift.options());

  cuda::UpdateParams q{};
  q.features = features.const_data_ptr();
  q.row_stride = features.stride(0);
  q.col_stride = features.stride(1);
  q.labels = labels.const_data_ptr();
  q.label_stride = labels.stride(0);
  q.label_kind = label_kind(labels.scalar_type());
  q.batch = b;
  q.dim = p;
  q.classes = c;
  q.counts = counts.data_ptr<int64_t>();
  q.shift = shift.data_ptr<double>();
  q.sums = sums.data_ptr<double>();
  q.invalid = invalid.data_ptr<int64_t>();
  cuda::UpdateScratch::bind(q, base);
  q.centered = centered.data_ptr<double>();
  cuda::launch_update_stats(q, feature_kind(features.scalar_type()), stream);

  // Invalid rows of `centered` are zero, so the GEMM runs over the whole batch and the host
  // never needs the number of valid rows. The fast policy rounds the float64 centred rows to
  // float32 (O(BP) next to the O(BP²) product) for an IEEE float32 product, never TF32
  // (Ieee32Matmul, csrc/ops.h), added into the float64 scatter (docs/precision.md).
  accumulate_gram_(scatter, fast ? centered.to(at::kFloat) : centered, &mirror_upper_to_lower_cuda,
                   /*target_blocks=*/4,
                   /*min_height=*/64, /*min_rows=*/cuda_panel_min_rows(p));
}

at::Tensor ncc_mismatch_count_cuda(const at::Tensor& features, const at::Tensor& valid,
                                   const at::Tensor& weight, const at::Tensor& bias,
                                   const at::Tensor& class_means, const at::Tensor& present) {
  check_ncc_args(features, valid, weight, bias, class_means, present);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor out = at::zeros({}, features.options().dtype(at::kLong));
  const int64_t b = features.size(0);
  const int64_t p = features.size(1);
  const int64_t c = class_means.size(0);
  if (b == 0 || c == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const NccPlan plan = plan_ncc(weight, bias, class_means, present);
  // Row blocks keep the float64 temporaries within ~256 MB.
  const int64_t per_row = 8 * (p + 2 * c);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(b, (int64_t{1} << 28) / per_row));
  const at::Tensor mu_t = plan.mu.t();
  const at::Tensor weight_t = plan.weight.t();
  for (int64_t r0 = 0; r0 < b; r0 += rows) {
    const int64_t n = std::min(rows, b - r0);
    const at::Tensor x = features.narrow(0, r0, n);
    const at::Tensor v = valid.narrow(0, r0, n);
    at::Tensor centered = at::empty({n, p}, plan.center.options());
    cuda::launch_ncc_center(x.const_data_ptr(), feature_kind(x.scalar_type()), x.stride(0),
                            x.stride(1), v.const_data_ptr<bool>(), v.stride(0),
                            plan.center.const_data_ptr<double>(), n, p, centered.data_ptr<double>(),
                            stream);
    const at::Tensor near = at::mm(centered, mu_t);        // [n, C], contiguous
    const at::Tensor logits = at::mm(centered, weight_t);  // [n, C], contiguous
    cuda::launch_ncc_count(near.const_data_ptr<double>(), logits.const_data_ptr<double>(),
                           plan.sq_norms.const_data_ptr<double>(),
                           plan.bias.const_data_ptr<double>(), plan.present.const_data_ptr<bool>(),
                           v.const_data_ptr<bool>(), v.stride(0), n, c, out.data_ptr<int64_t>(),
                           stream);
  }
  return out;
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, CUDA, m) {
  m.impl("update_stats_", &ncfast::update_stats_cuda);
  m.impl("ncc_mismatch_count", &ncfast::ncc_mismatch_count_cuda);
}
