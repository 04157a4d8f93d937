// Fused fake-quantize kernels for CPU, registered as implementations of the
// mct_fx::* ops that mct_fx/kernels.py defines (the schemas live there).
//
// Every kernel walks the tensor in memory order, viewed as [outer, channels, inner]
// (channels = the per-channel axis, or 1 for per-tensor), so contiguous,
// channels_last and any other dense layout run without copies; the hot loops
// are plain float loops compiled for AVX2 and a generic x86-64 target
// (target_clones picks one at load time).  Arithmetic matches the pure-torch
// reference in mct_fx/kernels.py operation for operation:
//   q = clamp(nearbyint(x / s) + z, qmin, qmax);  y = (q - z) * s
// (round half to even, float32 math, NaN in -> NaN out, +-inf clamp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "layout.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using mct_fx::compute_type;
using mct_fx::like_layout;
using mct_fx::memory_view;
using mct_fx::params_of;
using mct_fx::View;

constexpr int64_t kChunk = 1024;  // values per run (and per conversion buffer for half/bfloat16)

// ----------------------------------------------------------------- the loops
// Templates over the compute type A (float; double for float64 inputs).  The
// float instantiations of the hot ones are wrapped in target_clones functions
// below, so they are compiled (and vectorised) for AVX2 and generic x86-64.

template <typename A>
MCT_FX_INLINE A clamp_nan(A q, A lo, A hi) {  // NaN passes through (std::fmin/fmax would drop it)
  return q < lo ? lo : (q > hi ? hi : q);
}

template <typename A>
MCT_FX_INLINE void fq_const_t(const A* __restrict__ x, A* __restrict__ y, int64_t n, A s, A z, A lo, A hi) {
  for (int64_t i = 0; i < n; ++i) {
    A q = clamp_nan(std::nearbyint(x[i] / s) + z, lo, hi);
    y[i] = (q - z) * s;
  }
}

template <typename A>
MCT_FX_INLINE void fq_vary_t(const A* __restrict__ x, A* __restrict__ y, int64_t n, const A* __restrict__ s, const A* __restrict__ z, A lo, A hi) {
  for (int64_t i = 0; i < n; ++i) {
    A q = clamp_nan(std::nearbyint(x[i] / s[i]) + z[i], lo, hi);
    y[i] = (q - z[i]) * s[i];
  }
}

template <typename A>
MCT_FX_INLINE void ste_const_t(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx, int64_t n, A s, A z, A lo, A hi) {
  for (int64_t i = 0; i < n; ++i) {
    A q = std::nearbyint(x[i] / s) + z;
    gx[i] = (q >= lo && q <= hi) ? g[i] : A(0);
  }
}

template <typename A>
MCT_FX_INLINE void ste_vary_t(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx, int64_t n, const A* __restrict__ s, const A* __restrict__ z, A lo, A hi) {
  for (int64_t i = 0; i < n; ++i) {
    A q = std::nearbyint(x[i] / s[i]) + z[i];
    gx[i] = (q >= lo && q <= hi) ? g[i] : A(0);
  }
}

// LSQ backward: grad_x (STE) and the terms of the scale / zero-point gradients,
// g * (round(v) - v) inside the grid, g * (q_clamped - z) outside for the scale;
// 0 inside, -g * s outside for the zero point.  Terms are products in the compute
// type, summed in double.  Branch-free selects so the term loop vectorises.
template <typename A, bool Vary>
MCT_FX_INLINE void lsq_terms(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx,
                             A* __restrict__ ts, A* __restrict__ tz, int64_t n, const A* __restrict__ s,
                             const A* __restrict__ z, A lo, A hi) {
  for (int64_t i = 0; i < n; ++i) {
    const A si = Vary ? s[i] : s[0], zi = Vary ? z[i] : z[0];
    const A v = x[i] / si;
    const A r = std::nearbyint(v);
    const A q = r + zi;
    const bool inside = (q >= lo) & (q <= hi);  // NaN is outside, as in the reference
    const A qc = q < lo ? lo : hi;
    gx[i] = inside ? g[i] : A(0);
    ts[i] = g[i] * (inside ? r - v : qc - zi);
    tz[i] = inside ? A(0) : -(g[i] * si);
  }
}

template <typename A>
MCT_FX_INLINE void lsq_t(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx, int64_t n,
                         const A* __restrict__ s, const A* __restrict__ z, bool vary, A lo, A hi,
                         double* __restrict__ gs, double* __restrict__ gz) {
  A ts[kChunk], tz[kChunk];  // n <= kChunk
  if (vary) {
    lsq_terms<A, true>(g, x, gx, ts, tz, n, s, z, lo, hi);
    for (int64_t i = 0; i < n; ++i) {
      gs[i] += static_cast<double>(ts[i]);
      gz[i] += static_cast<double>(tz[i]);
    }
    return;
  }
  lsq_terms<A, false>(g, x, gx, ts, tz, n, s, z, lo, hi);
  // kLanes independent double sums added up in a fixed order: vectorisable without
  // reassociating floating-point additions, and deterministic
  constexpr int kLanes = 8;
  double acc_s[kLanes] = {}, acc_z[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      acc_s[j] += static_cast<double>(ts[i + j]);
      acc_z[j] += static_cast<double>(tz[i + j]);
    }
  for (; i < n; ++i) {
    acc_s[0] += static_cast<double>(ts[i]);
    acc_z[0] += static_cast<double>(tz[i]);
  }
  for (int j = 0; j < kLanes; ++j) {
    *gs += acc_s[j];
    *gz += acc_z[j];
  }
}

// LUT: nearest of the sorted centers c[0..k) (ties to the lower one) times the scale;
// values beyond the ends are clamped to them first (their nearest center, also for +-inf).
template <typename A>
MCT_FX_INLINE void lut_t(const A* __restrict__ x, A* __restrict__ y, int64_t n, const A* __restrict__ s, bool vary, const A* __restrict__ c, int64_t k) {
  for (int64_t i = 0; i < n; ++i) {
    A si = vary ? s[i] : s[0];
    A v = x[i] / si;
    if (std::isnan(v)) {
      y[i] = v;
      continue;
    }
    v = clamp_nan(v, c[0], c[k - 1]);
    int64_t best = 0;
    A best_d = std::fabs(v - c[0]);
    for (int64_t j = 1; j < k; ++j) {
      A d = std::fabs(v - c[j]);
      if (d < best_d) {
        best_d = d;
        best = j;
      }
    }
    y[i] = c[best] * si;
  }
}

template <typename A>
MCT_FX_INLINE void lut_ste_t(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx, int64_t n, const A* __restrict__ s, bool vary, A c_lo, A c_hi) {
  for (int64_t i = 0; i < n; ++i) {
    A v = x[i] / (vary ? s[i] : s[0]);
    gx[i] = (v >= c_lo && v <= c_hi) ? g[i] : A(0);
  }
}

MCT_FX_CLONES void fq_const_f(const float* __restrict__ x, float* __restrict__ y, int64_t n, float s, float z, float lo, float hi) {
  fq_const_t<float>(x, y, n, s, z, lo, hi);
}
MCT_FX_CLONES void fq_vary_f(const float* __restrict__ x, float* __restrict__ y, int64_t n, const float* __restrict__ s, const float* __restrict__ z, float lo,
                             float hi) {
  fq_vary_t<float>(x, y, n, s, z, lo, hi);
}
MCT_FX_CLONES void ste_const_f(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ gx, int64_t n, float s, float z, float lo,
                               float hi) {
  ste_const_t<float>(g, x, gx, n, s, z, lo, hi);
}
MCT_FX_CLONES void ste_vary_f(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ gx, int64_t n, const float* __restrict__ s,
                              const float* __restrict__ z, float lo, float hi) {
  ste_vary_t<float>(g, x, gx, n, s, z, lo, hi);
}
MCT_FX_CLONES void lsq_const_f(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ gx, int64_t n, const float* __restrict__ s,
                               const float* __restrict__ z, float lo, float hi, double* __restrict__ gs, double* __restrict__ gz) {
  lsq_t<float>(g, x, gx, n, s, z, false, lo, hi, gs, gz);
}

// Short rows (per-channel with a small inner size): one call handles a block of rows, so
// the per-row cost is a loop iteration, not a dispatched call.
template <typename A>
MCT_FX_INLINE void fq_rows_t(const A* __restrict__ x, A* __restrict__ y, int64_t r0, int64_t r1, int64_t inner,
                             int64_t C, const A* __restrict__ s, const A* __restrict__ z, A lo, A hi) {
  for (int64_t r = r0; r < r1; ++r) fq_const_t<A>(x + r * inner, y + r * inner, inner, s[r % C], z[r % C], lo, hi);
}
template <typename A>
MCT_FX_INLINE void ste_rows_t(const A* __restrict__ g, const A* __restrict__ x, A* __restrict__ gx, int64_t r0,
                              int64_t r1, int64_t inner, int64_t C, const A* __restrict__ s, const A* __restrict__ z,
                              A lo, A hi) {
  for (int64_t r = r0; r < r1; ++r)
    ste_const_t<A>(g + r * inner, x + r * inner, gx + r * inner, inner, s[r % C], z[r % C], lo, hi);
}
MCT_FX_CLONES void fq_rows_f(const float* x, float* y, int64_t r0, int64_t r1, int64_t inner, int64_t C,
                             const float* s, const float* z, float lo, float hi) {
  fq_rows_t<float>(x, y, r0, r1, inner, C, s, z, lo, hi);
}
MCT_FX_CLONES void ste_rows_f(const float* g, const float* x, float* gx, int64_t r0, int64_t r1, int64_t inner,
                              int64_t C, const float* s, const float* z, float lo, float hi) {
  ste_rows_t<float>(g, x, gx, r0, r1, inner, C, s, z, lo, hi);
}

// One entry point per loop for both compute types: float goes to the cloned versions.
template <typename A>
struct Loops {
  static void fq(const A* x, A* y, int64_t n, const A* s, const A* z, bool vary, A lo, A hi) {
    if (vary) fq_vary_t<A>(x, y, n, s, z, lo, hi);
    else fq_const_t<A>(x, y, n, *s, *z, lo, hi);
  }
  static void ste(const A* g, const A* x, A* gx, int64_t n, const A* s, const A* z, bool vary, A lo, A hi) {
    if (vary) ste_vary_t<A>(g, x, gx, n, s, z, lo, hi);
    else ste_const_t<A>(g, x, gx, n, *s, *z, lo, hi);
  }
  static void lsq(const A* g, const A* x, A* gx, int64_t n, const A* s, const A* z, bool vary, A lo, A hi,
                  double* gs, double* gz) {
    lsq_t<A>(g, x, gx, n, s, z, vary, lo, hi, gs, gz);
  }
};

template <>
struct Loops<float> {
  static void fq(const float* x, float* y, int64_t n, const float* s, const float* z, bool vary, float lo,
                 float hi) {
    if (vary) fq_vary_f(x, y, n, s, z, lo, hi);
    else fq_const_f(x, y, n, *s, *z, lo, hi);
  }
  static void ste(const float* g, const float* x, float* gx, int64_t n, const float* s, const float* z, bool vary,
                  float lo, float hi) {
    if (vary) ste_vary_f(g, x, gx, n, s, z, lo, hi);
    else ste_const_f(g, x, gx, n, *s, *z, lo, hi);
  }
  static void lsq(const float* g, const float* x, float* gx, int64_t n, const float* s, const float* z, bool vary,
                  float lo, float hi, double* gs, double* gz) {
    if (vary) lsq_t<float>(g, x, gx, n, s, z, true, lo, hi, gs, gz);
    else lsq_const_f(g, x, gx, n, s, z, lo, hi, gs, gz);
  }
};

// Compute-type views of a run: zero-copy when the storage type is the compute type,
// converted through a buffer otherwise (float16 / bfloat16).
template <typename T, typename A>
const A* load(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}
template <typename T, typename A>
A* target(T* dst, A* buf) {
  if constexpr (std::is_same_v<T, A>) return dst;
  else return buf;
}
template <typename T, typename A>
void store(const A* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, A>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
}

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Runs f(first_index, count, channel, vary) in parallel over memory order, in runs
// of at most kChunk values.  vary == false: the whole run has channel `channel`;
// vary == true (channels innermost): value j of the run has channel `channel + j`.
template <typename F>
void for_runs(const View& v, F f) {
  const int64_t n = v.x.numel();
  if (n == 0) return;
  const bool innermost = v.channels > 1 && v.inner == 1;
  const int64_t rows = innermost ? v.outer : v.outer * v.channels;
  const int64_t run = innermost ? v.channels : v.inner;
  const int64_t per_row = (run + kChunk - 1) / kChunk;  // chunks per row
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(run, kChunk));
  at::parallel_for(0, rows * per_row, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / per_row, off = (t % per_row) * kChunk;
      const int64_t c = innermost || v.channels == 1 ? 0 : r % v.channels;
      f(r * run + off, std::min(kChunk, run - off), innermost ? off : c, innermost);
    }
  });
}

// Float tensors whose channel runs are short go through the row-block kernels.
bool short_rows(const View& v, at::ScalarType t) {
  return t == at::kFloat && v.channels > 1 && v.inner > 1 && v.inner < kChunk;
}

// Runs f(first_row, end_row) over rows of `inner` values in parallel.
template <typename F>
void for_rows(const View& v, F f) {
  if (v.x.numel() == 0) return;
  const int64_t rows = v.outer * v.channels;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / v.inner), f);
}

void check_inputs(const at::Tensor& x, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x.device().is_cpu(), "mct_fx: CPU kernel got a ", x.device(), " tensor");
  TORCH_CHECK(qmin <= qmax, "mct_fx: qmin ", qmin, " > qmax ", qmax);
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "mct_fx: fake quantize supports float32/float16/bfloat16/float64, got ", st);
}

// A fresh output laid out like `x`.  Large outputs ask for transparent huge pages: with 4 KiB pages
// the first touch of a fresh allocation (a page fault that zeroes each page) costs as much as the
// kernel itself at 1e7 elements, and glibc maps every allocation above 32 MiB fresh.  Advice only: a
// kernel that refuses it changes nothing.
at::Tensor empty_output(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto& storage = y.storage();
  if (storage.nbytes() >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage.mutable_data());
    const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + storage.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return y;
}

#define MCT_FX_DISPATCH(T, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, "mct_fx", __VA_ARGS__)

// ------------------------------------------------------------------- ops

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                          int64_t qmax, std::optional<int64_t> axis) {
  check_inputs(x, qmin, qmax);
  View v = memory_view(x, axis);
  at::Tensor s = params_of(scale, v, "scale"), z = params_of(zero_point, v, "zero_point");
  at::Tensor y = empty_output(v.x);
  if (short_rows(v, x.scalar_type())) {
    const float *xp = v.x.data_ptr<float>(), *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_rows(v, [&](int64_t r0, int64_t r1) {
      fq_rows_f(xp, yp, r0, r1, v.inner, v.channels, sp, zp, static_cast<float>(qmin), static_cast<float>(qmax));
    });
    return y;
  }
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    const A *sp = s.data_ptr<A>(), *zp = z.data_ptr<A>();
    const A lo = static_cast<A>(qmin), hi = static_cast<A>(qmax);
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_runs(v, [&](int64_t i, int64_t n, int64_t c, bool vary) {
      A bx[kChunk], by[kChunk];
      A* out = target(yp + i, by);
      Loops<A>::fq(load(xp + i, bx, n), out, n, sp + c, zp + c, vary, lo, hi);
      store(out, yp + i, n);
    });
  });
  return y;
}

at::Tensor ste_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
  check_inputs(x, qmin, qmax);
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale, v, "scale"), z = params_of(zero_point, v, "zero_point");
  at::Tensor gx = empty_output(v.x);
  if (short_rows(v, x.scalar_type())) {
    const float *xp = v.x.data_ptr<float>(), *gp = g.data_ptr<float>();
    const float *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
    float* op = gx.data_ptr<float>();
    for_rows(v, [&](int64_t r0, int64_t r1) {
      ste_rows_f(gp, xp, op, r0, r1, v.inner, v.channels, sp, zp, static_cast<float>(qmin), static_cast<float>(qmax));
    });
    return gx;
  }
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    const A *sp = s.data_ptr<A>(), *zp = z.data_ptr<A>();
    const A lo = static_cast<A>(qmin), hi = static_cast<A>(qmax);
    const scalar_t *xp = v.x.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    for_runs(v, [&](int64_t i, int64_t n, int64_t c, bool vary) {
      A bx[kChunk], bg[kChunk], bo[kChunk];
      A* out = target(op + i, bo);
      Loops<A>::ste(load(gp + i, bg, n), load(xp + i, bx, n), out, n, sp + c, zp + c, vary, lo, hi);
      store(out, op + i, n);
    });
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& scale,
                                                                 const at::Tensor& zero_point, int64_t qmin,
                                                                 int64_t qmax, std::optional<int64_t> axis) {
  check_inputs(x, qmin, qmax);
  if (x.numel() == 0) return {at::empty_like(x), at::zeros_like(scale), at::zeros_like(zero_point)};
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale, v, "scale"), z = params_of(zero_point, v, "zero_point");
  at::Tensor gx = empty_output(v.x);
  const int64_t C = v.channels;
  // one row of partial sums per chunk of rows; the fixed chunking keeps the sums deterministic
  const int64_t n_chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part_s(n_chunks * C, 0.0), part_z(n_chunks * C, 0.0);
  const bool innermost = C > 1 && v.inner == 1;
  const int64_t rows = innermost ? v.outer : v.outer * C;
  const int64_t run = innermost ? C : v.inner;
  const int64_t per_row = (run + kChunk - 1) / kChunk, units = rows * per_row;
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    const A *sp = s.data_ptr<A>(), *zp = z.data_ptr<A>();
    const A lo = static_cast<A>(qmin), hi = static_cast<A>(qmax);
    const scalar_t *xp = v.x.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<A> bx(kChunk), bg(kChunk), bo(kChunk);
      for (int64_t k = k0; k < k1; ++k) {
        double* ps = part_s.data() + k * C;
        double* pz = part_z.data() + k * C;
        for (int64_t u = units * k / n_chunks; u < units * (k + 1) / n_chunks; ++u) {
          const int64_t r = u / per_row, off = (u % per_row) * kChunk;
          const int64_t n = std::min(kChunk, run - off), i = r * run + off;
          const int64_t ch = innermost ? off : (C == 1 ? 0 : r % C);
          A* out = target(op + i, bo.data());
          Loops<A>::lsq(load(gp + i, bg.data(), n), load(xp + i, bx.data(), n), out, n, sp + ch, zp + ch,
                        innermost, lo, hi, ps + ch, pz + ch);
          store(out, op + i, n);
        }
      }
    });
  });
  at::Tensor gs = at::zeros({C}, at::kDouble), gz = at::zeros({C}, at::kDouble);
  double *gsp = gs.data_ptr<double>(), *gzp = gz.data_ptr<double>();
  for (int64_t k = 0; k < n_chunks; ++k)
    for (int64_t c = 0; c < C; ++c) {
      gsp[c] += part_s[k * C + c];
      gzp[c] += part_z[k * C + c];
    }
  return {gx, gs.to(scale.scalar_type()).reshape(scale.sizes()),
          gz.to(zero_point.scalar_type()).reshape(zero_point.sizes())};
}

at::Tensor sorted_centers(const at::Tensor& centers, at::ScalarType type) {
  at::Tensor c = std::get<0>(centers.to(compute_type(type)).reshape({-1}).sort()).contiguous();
  TORCH_CHECK(c.numel() >= 1, "mct_fx: a LUT needs at least one center");
  return c;
}

at::Tensor lut_cpu(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& scale,
                   std::optional<int64_t> axis) {
  check_inputs(x, 0, 0);
  View v = memory_view(x, axis);
  at::Tensor s = params_of(scale, v, "scale"), c = sorted_centers(centers, x.scalar_type());
  at::Tensor y = empty_output(v.x);
  const int64_t k = c.numel();
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    const A *sp = s.data_ptr<A>(), *cp = c.data_ptr<A>();
    const scalar_t* xp = v.x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_runs(v, [&](int64_t i, int64_t n, int64_t ch, bool vary) {
      A bx[kChunk], by[kChunk];
      A* out = target(yp + i, by);
      lut_t<A>(load(xp + i, bx, n), out, n, sp + ch, vary, cp, k);
      store(out, yp + i, n);
    });
  });
  return y;
}

at::Tensor lut_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& centers,
                            const at::Tensor& scale, std::optional<int64_t> axis) {
  check_inputs(x, 0, 0);
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale, v, "scale"), c = sorted_centers(centers, x.scalar_type());
  at::Tensor gx = empty_output(v.x);
  const int64_t k = c.numel();
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    const A *sp = s.data_ptr<A>(), *cp = c.data_ptr<A>();
    const scalar_t *xp = v.x.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    for_runs(v, [&](int64_t i, int64_t n, int64_t ch, bool vary) {
      A bx[kChunk], bg[kChunk], bo[kChunk];
      A* out = target(op + i, bo);
      lut_ste_t<A>(load(gp + i, bg, n), load(xp + i, bx, n), out, n, sp + ch, vary, cp[0], cp[k - 1]);
      store(out, op + i, n);
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mct_fx, CPU, m) {
  m.impl("fake_quant", &fake_quant_cpu);
  m.impl("fake_quant_backward", &ste_backward_cpu);
  m.impl("fake_quant_lsq_backward", &lsq_backward_cpu);
  m.impl("fake_quant_lut", &lut_cpu);
  m.impl("fake_quant_lut_backward", &lut_backward_cpu);
}
