// The ncfast operator library: schemas (registered once, here), argument checks, the
// device-generic ops built from ATen calls, and the Python module `ncfast._C` that loads it all.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "common.h"
#include "ops.h"

#ifndef NCFAST_CUDA_ARCH_LIST
#define NCFAST_CUDA_ARCH_LIST ""
#endif

#if defined(__clang__)
#define NCFAST_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define NCFAST_COMPILER "gcc " __VERSION__
#else
#define NCFAST_COMPILER "unknown compiler"
#endif

namespace ncfast {

int label_kind(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kByte:
      return kLabelU8;
    case at::kChar:
      return kLabelI8;
    case at::kShort:
      return kLabelI16;
    case at::kInt:
      return kLabelI32;
    case at::kLong:
      return kLabelI64;
    case at::kUInt16:
      return kLabelU16;
    case at::kUInt32:
      return kLabelU32;
    case at::kUInt64:
      return kLabelU64;
    default:
      TORCH_CHECK_TYPE(false, "ncfast: labels must be an integer tensor (uint8, int8, int16, ",
                       "int32, int64, uint16, uint32, uint64), got ", dtype);
  }
}

int feature_kind(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    default:
      TORCH_CHECK_TYPE(false, "ncfast: features must be float16, bfloat16, float32 or float64, ",
                       "got ", dtype);
  }
}

namespace {

void check_state(const at::Tensor& t, const char* name, c10::ScalarType dtype,
                 at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "ncfast: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "ncfast: ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, "ncfast: ", name, " is on ", t.device(),
                    " but features are on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "ncfast: ", name, " must be contiguous");
}

}  // namespace

void check_update_args(const at::Tensor& features, const at::Tensor& labels,
                       const at::Tensor& counts, const at::Tensor& shift, const at::Tensor& sums,
                       const at::Tensor& scatter, const at::Tensor& invalid) {
  TORCH_CHECK_VALUE(features.dim() == 2, "ncfast: features must be [B, P], got shape ",
                    features.sizes());
  feature_kind(features.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0),
                    "ncfast: labels must have shape [B] = [", features.size(0), "], got ",
                    labels.sizes());
  label_kind(labels.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() == 1, "ncfast: counts must be [C], got shape ", counts.sizes());
  const int64_t c = counts.size(0);
  const int64_t p = features.size(1);
  const auto device = features.device();
  TORCH_CHECK_VALUE(labels.device() == device, "ncfast: labels are on ", labels.device(),
                    " but features on ", device);
  check_state(counts, "counts", at::kLong, {c}, device);
  check_state(shift, "shift", at::kDouble, {c, p}, device);
  check_state(sums, "sums", at::kDouble, {c, p}, device);
  check_state(scatter, "scatter", at::kDouble, {p, p}, device);
  check_state(invalid, "invalid", at::kLong, {2}, device);
  TORCH_CHECK_VALUE(features.size(0) < std::numeric_limits<int32_t>::max() &&
                        c < std::numeric_limits<int32_t>::max(),
                    "ncfast: batch size and number of classes must be below 2^31");
}

void check_ncc_args(const at::Tensor& features, const at::Tensor& valid, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& class_means,
                    const at::Tensor& present) {
  TORCH_CHECK_VALUE(features.dim() == 2, "ncfast: features must be [B, P], got shape ",
                    features.sizes());
  feature_kind(features.scalar_type());
  const int64_t b = features.size(0);
  const int64_t p = features.size(1);
  TORCH_CHECK_VALUE(class_means.dim() == 2 && class_means.size(1) == p,
                    "ncfast: class_means must be [C, ", p, "], got ", class_means.sizes());
  const int64_t c = class_means.size(0);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == c && weight.size(1) == p,
                    "ncfast: weight must be [", c, ", ", p, "], got ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == c, "ncfast: bias must be [", c, "], got ",
                    bias.sizes());
  TORCH_CHECK_VALUE(valid.dim() == 1 && valid.size(0) == b, "ncfast: valid must be [", b, "], got ",
                    valid.sizes());
  TORCH_CHECK_VALUE(present.dim() == 1 && present.size(0) == c, "ncfast: present must be [", c,
                    "], got ", present.sizes());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool && present.scalar_type() == at::kBool,
                   "ncfast: valid and present must be bool tensors");
  for (const at::Tensor* t : {&valid, &weight, &bias, &class_means, &present}) {
    TORCH_CHECK_VALUE(t->device() == features.device(),
                      "ncfast: every argument of ncc_mismatch_count must be on ", features.device(),
                      ", got one on ", t->device());
  }
  TORCH_CHECK_VALUE(b < std::numeric_limits<int32_t>::max(),
                    "ncfast: batch size must be below 2^31");
}

int64_t gram_panel_height(int64_t n, int64_t p, int64_t target_blocks, int64_t min_height,
                          int64_t min_rows) {
  const char* mode = std::getenv("NCFAST_GRAM");
  if (mode != nullptr && std::strcmp(mode, "full") == 0) return 0;
  if (mode != nullptr && std::strcmp(mode, "panels") == 0) {
    return p > 1 ? std::max<int64_t>(1, (p + 2) / 3) : 0;
  }
  int64_t height = ((p + target_blocks - 1) / target_blocks + 31) / 32 * 32;
  height = std::max(height, min_height);
  return n >= min_rows && height < p ? height : 0;
}

namespace {
std::mutex& ieee32_mutex() {
  static std::mutex mutex;
  return mutex;
}

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
// torch >= 2.10: one precision per backend and op. Sets `backend`'s matmul precision to IEEE
// and returns what it was.
int force_ieee(at::Float32Backend backend) {
  at::Context& ctx = at::globalContext();
  const at::Float32Precision saved = ctx.float32Precision(backend, at::Float32Op::MATMUL);
  if (saved != at::Float32Precision::IEEE) {
    ctx.setFloat32Precision(backend, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
  return static_cast<int>(saved);
}

void restore(at::Float32Backend backend, int saved) {
  const auto precision = static_cast<at::Float32Precision>(saved);
  if (precision != at::Float32Precision::IEEE) {
    at::globalContext().setFloat32Precision(backend, at::Float32Op::MATMUL, precision);
  }
}

int force_ieee_cuda() { return force_ieee(at::Float32Backend::CUDA); }
int force_ieee_mkldnn() { return force_ieee(at::Float32Backend::MKLDNN); }
void restore_cuda(int saved) { restore(at::Float32Backend::CUDA, saved); }
void restore_mkldnn(int saved) { restore(at::Float32Backend::MKLDNN, saved); }
#else
// Older torch: one float32 matmul precision ("highest" is IEEE for cuBLAS and oneDNN alike).
const char* precision_name(at::Float32MatmulPrecision precision) {
  switch (precision) {
    case at::Float32MatmulPrecision::HIGH:
      return "high";
    case at::Float32MatmulPrecision::MEDIUM:
      return "medium";
    default:
      return "highest";
  }
}

int force_ieee_cuda() {
  const at::Float32MatmulPrecision saved = at::globalContext().float32MatmulPrecision();
  if (saved != at::Float32MatmulPrecision::HIGHEST) {
    at::globalContext().setFloat32MatmulPrecision("highest");
  }
  return static_cast<int>(saved);
}
int force_ieee_mkldnn() { return 0; }  // the same flag, forced above
void restore_cuda(int saved) {
  const auto precision = static_cast<at::Float32MatmulPrecision>(saved);
  if (precision != at::Float32MatmulPrecision::HIGHEST) {
    at::globalContext().setFloat32MatmulPrecision(precision_name(precision));
  }
}
void restore_mkldnn(int) {}
#endif
}  // namespace

Ieee32Matmul::Ieee32Matmul()
    : lock_(ieee32_mutex()), cuda_saved_(force_ieee_cuda()), mkldnn_saved_(force_ieee_mkldnn()) {}

Ieee32Matmul::~Ieee32Matmul() {
  restore_mkldnn(mkldnn_saved_);
  restore_cuda(cuda_saved_);
}

void add_gram_block_(at::Tensor& out, const at::Tensor& z_left, const at::Tensor& z_right) {
  if (z_left.scalar_type() == at::kDouble) {
    out.addmm_(z_left.t(), z_right);
  } else {
    out.add_(at::mm(z_left.t(), z_right));
  }
}

void accumulate_gram_(at::Tensor& scatter, const at::Tensor& z, MirrorFn mirror,
                      int64_t target_blocks, int64_t min_height, int64_t min_rows) {
  const int64_t n = z.size(0);
  const int64_t p = z.size(1);
  if (n == 0 || p == 0) return;
  std::optional<Ieee32Matmul> ieee;
  if (z.scalar_type() != at::kDouble) ieee.emplace();
  const int64_t height = gram_panel_height(n, p, target_blocks, min_height, min_rows);
  if (height == 0) {
    add_gram_block_(scatter, z, z);
    return;
  }
  for (int64_t r0 = 0; r0 < p; r0 += height) {
    const int64_t len = std::min(height, p - r0);
    at::Tensor block = scatter.narrow(0, r0, len).narrow(1, r0, p - r0);
    add_gram_block_(block, z.narrow(1, r0, len), z.narrow(1, r0, p - r0));
  }
  mirror(scatter);
}

NccPlan plan_ncc(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& class_means,
                 const at::Tensor& present) {
  NccPlan plan;
  const at::Tensor mask = present.to(at::kDouble);
  plan.center = at::mv(class_means.to(at::kDouble).t(), mask) / mask.sum().clamp_min(1);
  plan.mu = class_means.to(at::kDouble) - plan.center;
  plan.weight = weight.to(at::kDouble);
  plan.sq_norms = plan.mu.square().sum(1);
  plan.bias = at::addmv(bias.to(at::kDouble), plan.weight, plan.center).contiguous();
  plan.present = present.contiguous();
  return plan;
}

}  // namespace ncfast

TORCH_LIBRARY(ncfast, m) {
  m.def(
      "update_stats_(Tensor features, Tensor labels, Tensor(a!) counts, Tensor(b!) shift, "
      "Tensor(c!) sums, Tensor(d!) scatter, Tensor(e!) invalid, bool fast=False) -> ()");
  m.def(
      "ncc_mismatch_count(Tensor features, Tensor valid, Tensor weight, Tensor bias, "
      "Tensor class_means, Tensor present) -> Tensor");
}

TORCH_LIBRARY_IMPL(ncfast, CPU, m) {
  m.impl("update_stats_", &ncfast::update_stats_cpu);
  m.impl("ncc_mismatch_count", &ncfast::ncc_mismatch_count_cpu);
}

#ifndef NCFAST_WITH_CUDA
namespace ncfast {
bool compiled_with_cuda() { return false; }
int compiled_cuda_version() { return 0; }
}  // namespace ncfast
#endif

// `import ncfast._C` loads the library above (the registrations run as static initialisers)
// and exposes how it was built.
static struct PyModuleDef ncfast_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "ncfast native ops, registered as torch.ops.ncfast.* (see ncfast/_native.py)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&ncfast_module);
  if (module == nullptr) return nullptr;
  const int cuda_version = ncfast::compiled_cuda_version();
  const bool ok =
      PyModule_AddIntConstant(module, "with_cuda", ncfast::compiled_with_cuda() ? 1 : 0) == 0 &&
      PyModule_AddIntConstant(module, "cuda_version_int", cuda_version) == 0 &&
      PyModule_AddStringConstant(module, "cuda_arch_list", NCFAST_CUDA_ARCH_LIST) == 0 &&
      PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) == 0 &&
      PyModule_AddStringConstant(module, "compiler", NCFAST_COMPILER) == 0;
  if (!ok) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
