// Layout helpers shared by the CPU and CUDA kernels of the mct_fx ops, and the CPU
// kernels' compile attributes.
#pragma once

// CPU hot loops are compiled for AVX2 and generic x86-64 (target_clones picks one at load
// time); their loop templates must be inlined into those wrappers to be vectorised.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MCT_FX_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MCT_FX_CLONES
#endif
#define MCT_FX_INLINE inline __attribute__((always_inline))

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace mct_fx {

struct View {
  at::Tensor x;  // dense, non-overlapping (a copy of the input if it was not)
  int64_t outer = 1, channels = 1, inner = 1;
};

inline bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

// [outer, channels, inner] in memory order for `axis` (nullopt: per-tensor).
inline View memory_view(const at::Tensor& input, std::optional<int64_t> axis) {
  View v;
  v.x = dense(input) ? input : input.contiguous();
  v.inner = v.x.numel();
  if (!axis.has_value() || v.inner == 0) return v;  // per-tensor, or nothing to do
  const int64_t dim = v.x.dim();
  const int64_t a = *axis < 0 ? *axis + dim : *axis;
  TORCH_CHECK(a >= 0 && a < dim, "mct_fx: axis ", *axis, " out of range for a ", dim, "-d tensor");
  auto strides = v.x.strides();
  auto sizes = v.x.sizes();
  if (sizes[a] <= 1) return v;  // one channel: per-tensor
  // dims of size > 1 sorted by decreasing stride = memory order of a dense tensor
  std::vector<int64_t> order;
  for (int64_t d = 0; d < dim; ++d)
    if (sizes[d] > 1) order.push_back(d);
  std::sort(order.begin(), order.end(), [&](int64_t l, int64_t r) { return strides[l] > strides[r]; });
  v.inner = 1;
  bool before = true;
  for (int64_t d : order) {
    if (d == a) {
      before = false;
      continue;
    }
    (before ? v.outer : v.inner) *= sizes[d];
  }
  v.channels = sizes[a];
  return v;
}

// Compute type of an input dtype: float64 stays float64, everything else computes in float32.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline at::Tensor params_of(const at::Tensor& p, const View& v, const char* what) {
  at::Tensor f = p.to(compute_type(v.x.scalar_type())).contiguous().reshape({-1});
  if (v.x.numel() == 0) return f;  // nothing to quantize: any parameters will do
  TORCH_CHECK(f.numel() == v.channels || (v.channels == 1 && f.numel() == 1), "mct_fx: ", what, " has ",
              f.numel(), " values for ", v.channels, " channels");
  return f;
}

// Same strides as `like` (autograd may hand us a gradient in another layout).
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.sizes() == like.sizes()) return t;
  at::Tensor out = at::empty_like(like, t.options());
  out.copy_(t);
  return out;
}

}  // namespace mct_fx
