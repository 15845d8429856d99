// Shared by the CPU and CUDA implementations: element loaders and the kind codes that let one
// kernel read any label dtype without instantiating a template per dtype.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define NCFAST_HD __host__ __device__ __forceinline__
#else
#define NCFAST_HD inline
#endif

namespace ncfast {

// Label dtypes read at run time (a switch per row is free next to reading P features).
enum LabelKind : int {
  kLabelU8 = 0,
  kLabelI8 = 1,
  kLabelI16 = 2,
  kLabelI32 = 3,
  kLabelI64 = 4,
  kLabelU16 = 5,
  kLabelU32 = 6,
  kLabelU64 = 7,
};

// Feature dtypes; the kernels are templates over these four only.
enum FeatureKind : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// Reads labels[index] as int64; a uint64 label above INT64_MAX becomes -1 (out of range).
NCFAST_HD int64_t load_label(const void* base, int64_t index, int kind) {
  switch (kind) {
    case kLabelU8:
      return static_cast<const uint8_t*>(base)[index];
    case kLabelI8:
      return static_cast<const int8_t*>(base)[index];
    case kLabelI16:
      return static_cast<const int16_t*>(base)[index];
    case kLabelI32:
      return static_cast<const int32_t*>(base)[index];
    case kLabelU16:
      return static_cast<const uint16_t*>(base)[index];
    case kLabelU32:
      return static_cast<const uint32_t*>(base)[index];
    case kLabelU64: {
      const uint64_t v = static_cast<const uint64_t*>(base)[index];
      return v > static_cast<uint64_t>(INT64_MAX) ? -1 : static_cast<int64_t>(v);
    }
    default:
      return static_cast<const int64_t*>(base)[index];
  }
}

}  // namespace ncfast
