// Host-side declarations shared by the op registrations, the CPU and the CUDA implementations.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

#include <mutex>
#include <tuple>

namespace ncfast {

// Argument checks: ValueError/TypeError naming the argument (TORCH_CHECK_VALUE/TYPE).
int label_kind(c10::ScalarType dtype);
int feature_kind(c10::ScalarType dtype);
void check_update_args(const at::Tensor& features, const at::Tensor& labels,
                       const at::Tensor& counts, const at::Tensor& shift, const at::Tensor& sums,
                       const at::Tensor& scatter, const at::Tensor& invalid);
void check_ncc_args(const at::Tensor& features, const at::Tensor& valid, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& class_means,
                    const at::Tensor& present);

// How scatter += zᵀz (z [n, P] float64) is split: 0 for one full product, else the height h
// of the blocks of the upper triangle that are computed (≈ (1 + 1/k)/2 of the flops of the full
// product for k = ⌈P/h⌉; the lower triangle is then a copy). h is about P / target_blocks,
// at least min_height, and the split is used from min_rows rows on.
// NCFAST_GRAM=full|panels forces a scheme (tests, benchmarks).
int64_t gram_panel_height(int64_t n, int64_t p, int64_t target_blocks, int64_t min_height,
                          int64_t min_rows);

// For the scope of the guard, float32 products are IEEE float32 whatever torch's global flags
// say: never TF32 (cuBLAS and cuBLASLt on CUDA) nor bf16/TF32 (oneDNN on CPUs). NoTF32Guard is
// thread-local but torch's cuBLASLt and oneDNN paths read only the global flags, so those are
// set to IEEE and restored afterwards, under one process-wide lock (two guards never interleave;
// a product of another thread meanwhile can only become more precise, never less).
class Ieee32Matmul {
 public:
  Ieee32Matmul();
  ~Ieee32Matmul();
  Ieee32Matmul(const Ieee32Matmul&) = delete;
  Ieee32Matmul& operator=(const Ieee32Matmul&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  at::NoTF32Guard no_tf32_;
  // What the flags were (torch ≥ 2.10: the CUDA and oneDNN matmul precisions; older torch: the
  // one float32 matmul precision in both fields), as the enums' values.
  int cuda_saved_;
  int mkldnn_saved_;
};

// Adds zᵀz to the float64 scatter block `out`, z's rows being z_left (columns of the block's
// rows) and z_right: in float64 (addmm, z float64: the exact policy) or, z float32 (the fast
// policy), as one float32 product added into the float64 block: call it under Ieee32Matmul
// (taken once per update, outside any parallel region: it is a lock).
void add_gram_block_(at::Tensor& out, const at::Tensor& z_left, const at::Tensor& z_right);

// scatter += zᵀz with the upper triangle in row panels of that height, one product each
// (through ATen, so cuBLAS on the current stream), then `mirror`. z is float64 (exact) or
// float32 (fast, see add_gram_block_). Used on CUDA; the CPU update has its own variant
// (csrc/cpu/update_stats.cpp).
using MirrorFn = void (*)(at::Tensor& matrix);
void accumulate_gram_(at::Tensor& scatter, const at::Tensor& z, MirrorFn mirror,
                      int64_t target_blocks, int64_t min_height, int64_t min_rows);

// NC4 in centered coordinates (see reference.ncc_mismatch_count): with c = mean of the present
// class means and mu_k = μ_k − c, the nearest-center score of x is |mu_k|² − 2 (x − c)·mu_k and
// the classifier's logit is (x − c)·w_k + (b_k + w_k·c), so one centered copy of a row block
// and two GEMMs give both. The only [C, P] temporary is mu (as in the reference).
struct NccPlan {
  at::Tensor center;    // [P] float64
  at::Tensor mu;        // [C, P] float64
  at::Tensor weight;    // [C, P] float64 (the argument itself when already float64)
  at::Tensor sq_norms;  // [C] float64 (|mu_k|²)
  at::Tensor bias;      // [C] float64 (b + W c)
  at::Tensor present;   // [C] bool, contiguous
};
NccPlan plan_ncc(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& class_means,
                 const at::Tensor& present);

// CPU implementations (csrc/cpu).
// fast: the centred rows and their product in float32, added into the float64 scatter once
// per batch (docs/precision.md); false: float64 throughout (exact).
void update_stats_cpu(const at::Tensor& features, const at::Tensor& labels, at::Tensor& counts,
                      at::Tensor& shift, at::Tensor& sums, at::Tensor& scatter, at::Tensor& invalid,
                      bool fast);
at::Tensor ncc_mismatch_count_cpu(const at::Tensor& features, const at::Tensor& valid,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& class_means, const at::Tensor& present);

// Build facts for `ncfast info` (csrc/cuda/ops_cuda.cpp when CUDA is compiled in).
bool compiled_with_cuda();
int compiled_cuda_version();  // CUDART_VERSION, e.g. 13000; 0 without CUDA

}  // namespace ncfast
