// CPU NC4 mismatch count (semantics: ncfast.reference.ncc_mismatch_count).
//
// Per row block: upcast and center the rows, two dgemms against mu and W give the nearest-center
// scores and the logits, then argmin, argmax and the comparison happen in one sweep. Blocks
// bound the float64 temporaries (never [B, C] or [B, P] for a large batch); BLAS runs outside
// our parallel loops (it threads itself).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "../ops.h"

namespace ncfast {
namespace {

// torch.argmin/argmax semantics: first index wins ties, and NaN counts as the extreme value.
inline bool better_min(double v, double best) {
  if (std::isnan(v)) return !std::isnan(best);
  return !std::isnan(best) && v < best;
}
inline bool better_max(double v, double best) {
  if (std::isnan(v)) return !std::isnan(best);
  return !std::isnan(best) && v > best;
}

template <typename T>
int64_t count_typed(const at::Tensor& features, const bool* valid, int64_t valid_stride,
                    const NccPlan& plan) {
  const int64_t b = features.size(0);
  const int64_t p = features.size(1);
  const int64_t c = plan.sq_norms.size(0);
  const T* x = features.const_data_ptr<T>();
  const int64_t s0 = features.stride(0);
  const int64_t s1 = features.stride(1);
  const double* center = plan.center.const_data_ptr<double>();
  const double* sq = plan.sq_norms.const_data_ptr<double>();
  const double* bias = plan.bias.const_data_ptr<double>();
  const bool* present = plan.present.const_data_ptr<bool>();
  const at::Tensor mu_t = plan.mu.t();  // [P, C]
  const at::Tensor weight_t = plan.weight.t();

  // Blocks keep each float64 temporary within 32 MB; small work runs inline (the grains).
  const int64_t rows =
      std::max<int64_t>(1, std::min(b, (int64_t{1} << 22) / std::max<int64_t>(1, std::max(p, c))));
  const int64_t fill_grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, p));
  const int64_t sweep_grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, c));
  std::atomic<int64_t> total{0};
  for (int64_t r0 = 0; r0 < b; r0 += rows) {
    const int64_t n = std::min(rows, b - r0);
    at::Tensor xc = at::empty({n, p}, plan.center.options());
    double* xcp = xc.data_ptr<double>();
    at::parallel_for(0, n, fill_grain, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        double* out = xcp + r * p;
        if (!valid[(r0 + r) * valid_stride]) {
          std::fill(out, out + p, 0.0);
          continue;
        }
        const T* row = x + (r0 + r) * s0;
        for (int64_t j = 0; j < p; ++j) out[j] = static_cast<double>(row[j * s1]) - center[j];
      }
    });
    const at::Tensor near = at::mm(xc, mu_t);        // [n, C]: (x − c)·mu_k
    const at::Tensor logits = at::mm(xc, weight_t);  // [n, C]: (x − c)·w_k
    const double* sn = near.const_data_ptr<double>();
    const double* sl = logits.const_data_ptr<double>();
    at::parallel_for(0, n, sweep_grain, [&](int64_t first, int64_t last) {
      int64_t local = 0;
      for (int64_t r = first; r < last; ++r) {
        if (!valid[(r0 + r) * valid_stride]) continue;
        const double* sr = sn + r * c;
        const double* lr = sl + r * c;
        int64_t nearest = 0, predicted = 0;
        double best_d = std::numeric_limits<double>::infinity();
        double best_l = -std::numeric_limits<double>::infinity();
        for (int64_t k = 0; k < c; ++k) {
          const double d =
              present[k] ? sq[k] - 2.0 * sr[k] : std::numeric_limits<double>::infinity();
          if (k == 0 || better_min(d, best_d)) {
            best_d = d;
            nearest = k;
          }
          const double l = lr[k] + bias[k];
          if (k == 0 || better_max(l, best_l)) {
            best_l = l;
            predicted = k;
          }
        }
        local += nearest != predicted;
      }
      total += local;
    });
  }
  return total.load();
}

}  // namespace

at::Tensor ncc_mismatch_count_cpu(const at::Tensor& features, const at::Tensor& valid,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& class_means, const at::Tensor& present) {
  check_ncc_args(features, valid, weight, bias, class_means, present);
  at::Tensor out = at::zeros({}, features.options().dtype(at::kLong));
  if (features.size(0) == 0 || class_means.size(0) == 0) return out;
  const NccPlan plan = plan_ncc(weight, bias, class_means, present);
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "ncfast_ncc_mismatch_cpu", [&] {
        count =
            count_typed<scalar_t>(features, valid.const_data_ptr<bool>(), valid.stride(0), plan);
      });
  out.fill_(count);
  return out;
}

}  // namespace ncfast
