// Calibration statistics and grid-search kernels for CPU: mct_fx::histogram,
// mct_fx::quant_error and mct_fx::fit_scale (schemas in mct_fx/kernels.py).  For every row r and candidate k it sums, over the row's values,
//   c[n] * |(clamp(nearbyint(v[n] / s[r,k]) + z[r,k], qmin, qmax) - z[r,k]) * s[r,k] - v[n]|^p
// in one pass that never materialises the [R, K, N] quantized tensor the pure-torch
// reference builds.  A row (a channel's weights, or a histogram) stays in cache while
// all its candidates are tried.  Sums use 8 float lanes (vectorised for AVX2) folded in
// double; the reference sums in another order, so results agree to float rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "layout.h"

#include <cmath>
#include <algorithm>
#include <optional>
#include <vector>

namespace {


constexpr int kLanes = 8;

enum class Power { One, Two, Other };

template <Power P>
MCT_FX_INLINE float term(float e, float p) {
  if constexpr (P == Power::Two) {
    return e * e;
  } else if constexpr (P == Power::One) {
    return std::fabs(e);
  } else {
    return std::pow(std::fabs(e), p);
  }
}

template <Power P, bool Weighted>
MCT_FX_INLINE double row_error_t(const float* __restrict__ v, const float* __restrict__ c, int64_t n, float s,
                                 float z, float lo, float hi, float p) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float q = std::nearbyint(v[i + j] / s) + z;
      q = q < lo ? lo : (q > hi ? hi : q);
      float t = term<P>((q - z) * s - v[i + j], p);
      acc[j] += Weighted ? c[i + j] * t : t;
    }
  }
  double total = 0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  for (; i < n; ++i) {
    float q = std::nearbyint(v[i] / s) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    float t = term<P>((q - z) * s - v[i], p);
    total += Weighted ? c[i] * t : t;
  }
  return total;
}

MCT_FX_CLONES double row_error_2(const float* v, const float* c, int64_t n, float s, float z, float lo, float hi) {
  return c ? row_error_t<Power::Two, true>(v, c, n, s, z, lo, hi, 2.f)
           : row_error_t<Power::Two, false>(v, c, n, s, z, lo, hi, 2.f);
}

MCT_FX_CLONES double row_error_1(const float* v, const float* c, int64_t n, float s, float z, float lo, float hi) {
  return c ? row_error_t<Power::One, true>(v, c, n, s, z, lo, hi, 1.f)
           : row_error_t<Power::One, false>(v, c, n, s, z, lo, hi, 1.f);
}

double row_error_p(const float* v, const float* c, int64_t n, float s, float z, float lo, float hi, float p) {
  return c ? row_error_t<Power::Other, true>(v, c, n, s, z, lo, hi, p)
           : row_error_t<Power::Other, false>(v, c, n, s, z, lo, hi, p);
}

at::Tensor quant_error_cpu(const at::Tensor& values, const std::optional<at::Tensor>& counts, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, int64_t qmin, int64_t qmax, double p) {
  TORCH_CHECK(values.dim() == 2 && scale.dim() == 2 && scale.size(0) == values.size(0),
              "quant_error: values [R, N] and scale [R, K] expected, got ", values.sizes(), " and ", scale.sizes());
  TORCH_CHECK(qmin <= qmax, "quant_error: qmin > qmax");
  const int64_t rows = values.size(0), n = values.size(1), k_total = scale.size(1);
  auto v = values.to(at::kFloat).contiguous();
  auto s = scale.to(at::kFloat).contiguous();
  at::Tensor z, c;
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->sizes() == scale.sizes(), "quant_error: zero_point must match scale");
    z = zero_point->to(at::kFloat).contiguous();
  }
  if (counts.has_value()) {
    TORCH_CHECK(counts->dim() == 2 && counts->size(1) == n && (counts->size(0) == 1 || counts->size(0) == rows),
                "quant_error: counts [1 or R, N] expected, got ", counts->sizes());
    c = counts->to(at::kFloat).contiguous();
  }
  auto out = at::empty({rows, k_total}, values.options().dtype(at::kFloat));
  const float* vp = v.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  const float* cp = c.defined() ? c.data_ptr<float>() : nullptr;
  const bool shared_counts = c.defined() && c.size(0) == 1;
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), pf = static_cast<float>(p);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, n));
  at::parallel_for(0, rows * k_total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t r = idx / k_total;
      const float* row = vp + r * n;
      const float* crow = cp ? cp + (shared_counts ? 0 : r * n) : nullptr;
      const float sc = sp[idx], zc = zp ? zp[idx] : 0.f;
      double e = p == 2.0   ? row_error_2(row, crow, n, sc, zc, lo, hi)
                 : p == 1.0 ? row_error_1(row, crow, n, sc, zc, lo, hi)
                            : row_error_p(row, crow, n, sc, zc, lo, hi, pf);
      op[idx] = static_cast<float>(e);
    }
  });
  return out;
}

// Least-squares scale for the codes a scale gives: sum(c v k) / sum(c k^2), k = clamp(nearbyint(v / s)).
MCT_FX_CLONES void fit_row(const float* __restrict__ v, const float* __restrict__ c, int64_t n, float s, float lo,
                           float hi, double* num, double* den) {
  float a[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0}, b[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float k = std::nearbyint(v[i + j] / s);
      k = k < lo ? lo : (k > hi ? hi : k);
      float w = c ? c[i + j] : 1.f;
      a[j] += w * v[i + j] * k;
      b[j] += w * k * k;
    }
  }
  double sa = 0, sb = 0;
  for (int j = 0; j < kLanes; ++j) sa += a[j], sb += b[j];
  for (; i < n; ++i) {
    float k = std::nearbyint(v[i] / s);
    k = k < lo ? lo : (k > hi ? hi : k);
    float w = c ? c[i] : 1.f;
    sa += w * v[i] * k;
    sb += w * k * k;
  }
  *num = sa;
  *den = sb;
}

at::Tensor fit_scale_cpu(const at::Tensor& values, const std::optional<at::Tensor>& counts, const at::Tensor& scale,
                         int64_t qmin, int64_t qmax) {
  TORCH_CHECK(values.dim() == 2 && scale.dim() == 1 && scale.size(0) == values.size(0),
              "fit_scale: values [R, N] and scale [R] expected, got ", values.sizes(), " and ", scale.sizes());
  const int64_t rows = values.size(0), n = values.size(1);
  auto v = values.to(at::kFloat).contiguous();
  auto s = scale.to(at::kFloat).contiguous();
  at::Tensor c;
  if (counts.has_value()) {
    TORCH_CHECK(counts->dim() == 2 && counts->size(1) == n && (counts->size(0) == 1 || counts->size(0) == rows),
                "fit_scale: counts [1 or R, N] expected, got ", counts->sizes());
    c = counts->to(at::kFloat).contiguous();
  }
  auto out = at::empty({rows}, values.options().dtype(at::kFloat));
  const float* vp = v.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* cp = c.defined() ? c.data_ptr<float>() : nullptr;
  const bool shared = c.defined() && c.size(0) == 1;
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double num, den;
      fit_row(vp + r * n, cp ? cp + (shared ? 0 : r * n) : nullptr, n, sp[r], lo, hi, &num, &den);
      op[r] = den > 0 ? static_cast<float>(num / den) : sp[r];
    }
  });
  return out;
}

// Bin index exactly as the reference computes it: floor(x * (bins / 2) / r) + bins / 2, clamped
// (NaN: skipped).  Indices are computed a block at a time in a vectorisable loop, then counted.
MCT_FX_CLONES void histogram_run(const float* __restrict__ x, int64_t n, float half_bins, float r, int64_t bins,
                                 int64_t* __restrict__ counts) {
  constexpr int64_t kBlock = 256;
  int32_t idx[kBlock];
  const float top = static_cast<float>(bins - 1);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    for (int64_t i = 0; i < m; ++i) {
      float t = std::floor(x[b + i] * half_bins / r) + half_bins;
      t = t < 0.f ? 0.f : (t > top ? top : t);
      idx[i] = t == t ? static_cast<int32_t>(t) : -1;  // NaN compares unequal
    }
    for (int64_t i = 0; i < m; ++i)
      if (idx[i] >= 0) counts[idx[i]] += 1;
  }
}

at::Tensor histogram_cpu(const at::Tensor& x, const at::Tensor& range, int64_t bins) {
  TORCH_CHECK(bins >= 2 && bins % 2 == 0, "histogram: bins must be even and >= 2, got ", bins);
  TORCH_CHECK(range.numel() == 1, "histogram: range must be a scalar");
  auto v = x.to(at::kFloat).contiguous().reshape({-1});
  const float r = range.to(at::kFloat).item<float>();
  const int64_t n = v.numel();
  const float* vp = v.data_ptr<float>();
  const float half = static_cast<float>(bins / 2);
  const int64_t grain = 1 << 16;
  const int64_t chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  const int64_t parts = std::min<int64_t>(chunks, at::get_num_threads());
  std::vector<std::vector<int64_t>> local(parts, std::vector<int64_t>(bins, 0));
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) {
      const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
      histogram_run(vp + lo, hi - lo, half, r, bins, local[part].data());
    }
  });
  auto out = at::zeros({bins}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (const auto& c : local)
    for (int64_t i = 0; i < bins; ++i) op[i] += c[i];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mct_fx, CPU, m) {
  m.impl("histogram", &histogram_cpu);
  m.impl("quant_error", &quant_error_cpu);
  m.impl("fit_scale", &fit_scale_cpu);
}
