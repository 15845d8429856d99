// CPU fused statistics update (semantics: ncfast.reference.update_stats_).
//
// One pass classifies the rows (label range, finiteness) and a stable counting sort groups the
// valid ones by class. A second pass upcasts, subtracts each row's class shift and writes the
// centered rows z_i (float64; rounded to float32 under the fast policy, the sums staying
// float64) into a class-sorted buffer while summing them per class (blocks of whole rows; the
// result does not depend on the number of threads). Then scatter += ZᵀZ by BLAS (float64, or
// an IEEE float32 product added into the float64 scatter: docs/precision.md): for large batches
// only the upper triangle, in row panels, each panel one single-threaded dgemm plus the copy of its
// transpose onto the lower triangle, panels taken in pairs of equal cost by the threads (one
// parallel region for the whole Gram update).
//
// Work is handed out as tasks that threads take when free (run_tasks), not split statically:
// on a machine whose cores are shared (data-loader workers, other jobs) a descheduled thread
// then delays one task, not half the work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../common.h"
#include "../ops.h"

namespace ncfast {
namespace {

// Runs task(t) for every t in [0, count) on the intra-op threads, each taking the next task.
template <typename F>
void run_tasks(int64_t count, const F& task) {
  const int64_t threads = std::min<int64_t>(count, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < count; ++t) task(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < count; t = next++) task(t);
  });
}

template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}

template <typename T, bool kUnitStride>
bool row_is_finite(const T* row, int64_t p, int64_t col_stride) {
  // |v| <= max is false for NaN and ±inf; an integer reduction so that it vectorises.
  int bad = 0;
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < p; ++j) {
      const double v = row[kUnitStride ? j : j * col_stride];
      bad |= !(std::abs(v) <= std::numeric_limits<double>::max());
    }
  } else {
    for (int64_t j = 0; j < p; ++j) {
      const float v = as_float(row[kUnitStride ? j : j * col_stride]);
      bad |= !(std::abs(v) <= std::numeric_limits<float>::max());
    }
  }
  return bad == 0;
}

struct Segment {
  int64_t cls;
  int64_t begin;  // rows [begin, end) of the class-sorted order
  int64_t end;
  bool first_seen;
};

// A class seen for the first time takes this batch's class mean as its shift (first batch of a
// class only): column chunks in parallel, each owning its slice of the shifts.
template <typename T, bool kUnitStride>
void first_seen_shifts(const T* x, int64_t row_stride, int64_t col_stride, int64_t p,
                       const std::vector<int64_t>& order, const std::vector<Segment>& segments,
                       double* shift) {
  constexpr int64_t kChunk = 64;
  run_tasks((p + kChunk - 1) / kChunk, [&](int64_t k) {
    double acc[kChunk];
    const int64_t j0 = k * kChunk;
    const int64_t width = std::min(kChunk, p - j0);
    for (const Segment& seg : segments) {
      if (!seg.first_seen) continue;
      std::fill(acc, acc + width, 0.0);
      for (int64_t r = seg.begin; r < seg.end; ++r) {
        const T* xr = x + order[r] * row_stride + (kUnitStride ? j0 : j0 * col_stride);
        for (int64_t j = 0; j < width; ++j) {
          acc[j] += static_cast<double>(xr[kUnitStride ? j : j * col_stride]);
        }
      }
      const double n = static_cast<double>(seg.end - seg.begin);
      double* sh = shift + seg.cls * p + j0;
      for (int64_t j = 0; j < width; ++j) sh[j] = acc[j] / n;
    }
  });
}

// z_r = h_{order[r]} − s_c for the class-sorted rows r, and d_c += Σ z_r per class. Tasks are
// fixed blocks of sorted rows (whole rows: long contiguous streams). A class whose rows lie
// inside one block (not at its ends) is added to `sums` by that block; the runs at block ends,
// which classes can share with a neighbour, are summed after the parallel loop in block order,
// so the result does not depend on the number of threads.
template <typename T, bool kUnitStride, typename Z>
void center_rows(const T* x, int64_t row_stride, int64_t col_stride, int64_t p,
                 const std::vector<int64_t>& order, const std::vector<Segment>& segments,
                 const double* shift, double* sums, Z* z) {
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int64_t> row_segment(n);  // sorted row -> its segment
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s) {
    std::fill(row_segment.begin() + segments[s].begin, row_segment.begin() + segments[s].end, s);
  }
  const int64_t block = std::max<int64_t>(128, (n + 63) / 64);
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> edge_sums(static_cast<size_t>(blocks * 2 * p));
  std::vector<int64_t> edge_class(blocks * 2, -1);
  run_tasks(blocks, [&](int64_t t) {
    const int64_t a = t * block;
    const int64_t b = std::min(n, a + block);
    std::vector<double> acc(p);
    for (int64_t r = a; r < b;) {
      const Segment& seg = segments[row_segment[r]];
      const int64_t run_end = std::min(b, seg.end);
      const double* __restrict__ sh = shift + seg.cls * p;
      double* __restrict__ run_sum = acc.data();
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t rr = r; rr < run_end; ++rr) {
        const T* __restrict__ xr = x + order[rr] * row_stride;
        Z* __restrict__ zr = z + rr * p;
        for (int64_t j = 0; j < p; ++j) {  // restrict: no aliasing, so this vectorises
          const double v = static_cast<double>(xr[kUnitStride ? j : j * col_stride]) - sh[j];
          zr[j] = static_cast<Z>(v);
          run_sum[j] += v;
        }
      }
      const int64_t slot = r == a ? 0 : (run_end == b ? 1 : -1);
      if (slot < 0) {
        double* sm = sums + seg.cls * p;
        for (int64_t j = 0; j < p; ++j) sm[j] += acc[j];
      } else {
        edge_class[t * 2 + slot] = seg.cls;
        std::copy(acc.begin(), acc.end(), edge_sums.begin() + (t * 2 + slot) * p);
      }
      r = run_end;
    }
  });
  for (int64_t e = 0; e < blocks * 2; ++e) {
    if (edge_class[e] < 0) continue;
    double* sm = sums + edge_class[e] * p;
    const double* part = edge_sums.data() + e * p;
    for (int64_t j = 0; j < p; ++j) sm[j] += part[j];
  }
}

// m[i, j] = m[j, i] for the columns j in [r0, r1) of a panel and every row i > j: the lower
// triangle under the panel, from the panel's transpose (each panel writes only its columns).
void mirror_panel(double* m, int64_t p, int64_t r0, int64_t r1) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = r0; i0 < p; i0 += kTile) {
    const int64_t i1 = std::min(p, i0 + kTile);
    for (int64_t j0 = r0; j0 < r1 && j0 < i1; j0 += kTile) {
      const int64_t j1 = std::min(r1, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t jend = std::min(j1, i);
        for (int64_t j = j0; j < jend; ++j) m[i * p + j] = m[j * p + i];
      }
    }
  }
}

// scatter += zᵀz (z [n, P] float64, or float32 under the fast policy: add_gram_block_): one
// threaded GEMM for small batches; from 512 rows on, the upper triangle in row panels as above.
void accumulate_gram_cpu_(at::Tensor& scatter, const at::Tensor& z) {
  const int64_t n = z.size(0);
  const int64_t p = z.size(1);
  if (n == 0 || p == 0) return;
  std::optional<Ieee32Matmul> ieee;
  if (z.scalar_type() != at::kDouble) ieee.emplace();
  const int64_t height = gram_panel_height(n, p, /*target_blocks=*/8, /*min_height=*/128,
                                           /*min_rows=*/512);
  if (height == 0) {
    add_gram_block_(scatter, z, z);
    return;
  }
  const int64_t panels = (p + height - 1) / height;
  double* m = scatter.data_ptr<double>();
  const auto run_panel = [&](int64_t index) {
    const int64_t r0 = index * height;
    const int64_t len = std::min(height, p - r0);
    at::Tensor block = scatter.narrow(0, r0, len).narrow(1, r0, p - r0);
    add_gram_block_(block, z.narrow(1, r0, len), z.narrow(1, r0, p - r0));  // one thread
    mirror_panel(m, p, r0, r0 + len);
  };
  // Panel i costs ∝ P − i·h, so panels i and k−1−i together always cost the same.
  run_tasks((panels + 1) / 2, [&](int64_t pair) {
    run_panel(pair);
    if (panels - 1 - pair != pair) run_panel(panels - 1 - pair);
  });
}

template <typename T, bool kUnitStride, typename Z>
void center_into(const T* x, int64_t row_stride, int64_t col_stride, int64_t p,
                 const std::vector<int64_t>& order, const std::vector<Segment>& segments,
                 at::Tensor& shift, at::Tensor& sums, at::Tensor& z, bool any_first_seen) {
  double* sh = shift.data_ptr<double>();
  if (any_first_seen) {
    first_seen_shifts<T, kUnitStride>(x, row_stride, col_stride, p, order, segments, sh);
  }
  center_rows<T, kUnitStride, Z>(x, row_stride, col_stride, p, order, segments, sh,
                                 sums.data_ptr<double>(), z.data_ptr<Z>());
}

template <typename T>
void update_typed(const at::Tensor& features, const at::Tensor& labels, at::Tensor& counts,
                  at::Tensor& shift, at::Tensor& sums, at::Tensor& scatter, at::Tensor& invalid,
                  bool fast) {
  const int64_t b = features.size(0);
  const int64_t p = features.size(1);
  const int64_t c = counts.size(0);
  const T* x = features.const_data_ptr<T>();
  const int64_t row_stride = features.stride(0);
  const int64_t col_stride = features.stride(1);
  const bool unit = col_stride == 1 || p == 1;
  const void* label_ptr = labels.const_data_ptr();
  const int64_t label_stride = labels.stride(0);
  const int kind = label_kind(labels.scalar_type());

  // Pass 1: classify rows. row_class = class, or -1 (bad label) / -2 (non-finite features).
  std::vector<int64_t> row_class(b);
  // Inline (no parallel region) below ~1M elements: it is a fraction of the centering cost.
  const int64_t grain = std::max<int64_t>(256, (int64_t{1} << 20) / std::max<int64_t>(p, 1));
  at::parallel_for(0, b, grain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t label = load_label(label_ptr, i * label_stride, kind);
      if (label < 0 || label >= c) {
        row_class[i] = -1;
        continue;
      }
      const T* row = x + i * row_stride;
      const bool finite =
          unit ? row_is_finite<T, true>(row, p, 1) : row_is_finite<T, false>(row, p, col_stride);
      row_class[i] = finite ? label : -2;
    }
  });

  // Stable counting sort of the valid rows by class (O(B + C), sequential: cheap).
  int64_t* cnt = counts.data_ptr<int64_t>();
  std::vector<int64_t> batch_counts(c, 0);
  int64_t bad_label = 0, non_finite = 0;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t k = row_class[i];
    if (k >= 0) {
      ++batch_counts[k];
    } else if (k == -1) {
      ++bad_label;
    } else {
      ++non_finite;
    }
  }
  int64_t* inv = invalid.data_ptr<int64_t>();
  inv[0] += bad_label;
  inv[1] += non_finite;
  const int64_t n_valid = b - bad_label - non_finite;
  if (n_valid == 0) return;

  std::vector<int64_t> offset(c + 1, 0);
  std::vector<Segment> segments;
  for (int64_t k = 0; k < c; ++k) {
    offset[k + 1] = offset[k] + batch_counts[k];
    if (batch_counts[k] > 0) {
      segments.push_back({k, offset[k], offset[k + 1], cnt[k] == 0});
    }
  }
  std::vector<int64_t> order(n_valid);
  {
    std::vector<int64_t> next(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t k = row_class[i];
      if (k >= 0) order[next[k]++] = i;
    }
  }

  // Pass 2: first-seen shifts, then centered rows and class sums.
  const bool any_first_seen =
      std::any_of(segments.begin(), segments.end(), [](const Segment& s) { return s.first_seen; });
  at::Tensor z = at::empty({n_valid, p}, shift.options().dtype(fast ? at::kFloat : at::kDouble));
  if (unit && fast) {
    center_into<T, true, float>(x, row_stride, 1, p, order, segments, shift, sums, z,
                                any_first_seen);
  } else if (unit) {
    center_into<T, true, double>(x, row_stride, 1, p, order, segments, shift, sums, z,
                                 any_first_seen);
  } else if (fast) {
    center_into<T, false, float>(x, row_stride, col_stride, p, order, segments, shift, sums, z,
                                 any_first_seen);
  } else {
    center_into<T, false, double>(x, row_stride, col_stride, p, order, segments, shift, sums, z,
                                  any_first_seen);
  }

  // Pass 3: the within-class scatter of the centered rows.
  accumulate_gram_cpu_(scatter, z);
  for (int64_t k = 0; k < c; ++k) cnt[k] += batch_counts[k];
}

}  // namespace

void update_stats_cpu(const at::Tensor& features, const at::Tensor& labels, at::Tensor& counts,
                      at::Tensor& shift, at::Tensor& sums, at::Tensor& scatter, at::Tensor& invalid,
                      bool fast) {
  check_update_args(features, labels, counts, shift, sums, scatter, invalid);
  if (features.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "ncfast_update_stats_cpu", [&] {
        update_typed<scalar_t>(features, labels, counts, shift, sums, scatter, invalid, fast);
      });
}

}  // namespace ncfast
