// Fused fake-quantize kernels for CUDA: the same ops and arithmetic as the CPU kernels
// (fake_quant_cpu.cpp) and the pure-torch reference (mct_fx/kernels.py):
//   q = clamp(rint(x / s) + z, qmin, qmax);  y = (q - z) * s
// in float32 (float64 for float64 inputs), IEEE division (no fast math), NaN passes.
//
// Elementwise kernels walk memory order, one pass per direction; the channel of
// element i of the [outer, channels, inner] memory view is (i / inner) % channels.
// Float32 tensors use 16-byte (float4) loads and stores when aligned.  The LSQ
// backward reduces the scale / zero-point gradients in the kernel: a block sums its
// part of one channel in shared memory (double) and adds it atomically.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>
#include <type_traits>

#include "layout.h"

namespace {

using mct_fx::compute_type;
using mct_fx::like_layout;
using mct_fx::memory_view;
using mct_fx::params_of;
using mct_fx::View;

constexpr int kThreads = 256;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
__device__ __forceinline__ A rint_(A v) {
  if constexpr (std::is_same_v<A, double>) return rint(v);
  else return rintf(v);
}

template <typename A>
__device__ __forceinline__ A fq_one(A x, A s, A z, A lo, A hi) {
  A q = rint_(x / s) + z;
  q = q < lo ? lo : (q > hi ? hi : q);  // NaN passes
  return (q - z) * s;
}

template <typename A>
__device__ __forceinline__ bool inside_one(A x, A s, A z, A lo, A hi) {
  A q = rint_(x / s) + z;
  return q >= lo && q <= hi;
}

template <typename I>
__device__ __forceinline__ I channel_of(I i, I inner, I channels) {
  return channels == 1 ? I(0) : (i / inner) % channels;
}

// 32-bit indices (integer division is several times cheaper) whenever a grid-stride loop
// cannot overflow them; 64-bit beyond.
template <typename F>
void with_index_type(int64_t n, F&& f) {
  if (n <= INT32_MAX / 2) f(int32_t{});
  else f(int64_t{});
}

int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32)));
}

// ------------------------------------------------------------- forward / STE

template <typename T, typename I>
__global__ void fq_kernel(const T* __restrict__ x, T* __restrict__ y, I n, I inner, I channels,
                          const compute_t<T>* __restrict__ s, const compute_t<T>* __restrict__ z, compute_t<T> lo,
                          compute_t<T> hi) {
  using A = compute_t<T>;
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += I(blockDim.x) * gridDim.x) {
    const I c = channel_of(i, inner, channels);
    y[i] = static_cast<T>(fq_one<A>(static_cast<A>(x[i]), s[c], z[c], lo, hi));
  }
}

// float32 with a constant channel over every group of 4 (per-tensor, or inner % 4 == 0)
template <typename I>
__global__ void fq_kernel_vec4(const float4* __restrict__ x, float4* __restrict__ y, I n4, I inner, I channels,
                               const float* __restrict__ s, const float* __restrict__ z, float lo, float hi) {
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += I(blockDim.x) * gridDim.x) {
    const I c = channel_of(i * 4, inner, channels);
    const float sc = s[c], zc = z[c];
    float4 v = x[i];
    v.x = fq_one(v.x, sc, zc, lo, hi);
    v.y = fq_one(v.y, sc, zc, lo, hi);
    v.z = fq_one(v.z, sc, zc, lo, hi);
    v.w = fq_one(v.w, sc, zc, lo, hi);
    y[i] = v;
  }
}

template <typename T, typename I>
__global__ void ste_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx, I n, I inner,
                           I channels, const compute_t<T>* __restrict__ s, const compute_t<T>* __restrict__ z,
                           compute_t<T> lo, compute_t<T> hi) {
  using A = compute_t<T>;
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += I(blockDim.x) * gridDim.x) {
    const I c = channel_of(i, inner, channels);
    gx[i] = inside_one<A>(static_cast<A>(x[i]), s[c], z[c], lo, hi) ? g[i] : static_cast<T>(0.0f);
  }
}

template <typename I>
__global__ void ste_kernel_vec4(const float4* __restrict__ g, const float4* __restrict__ x, float4* __restrict__ gx,
                                I n4, I inner, I channels, const float* __restrict__ s, const float* __restrict__ z,
                                float lo, float hi) {
  for (I i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += I(blockDim.x) * gridDim.x) {
    const I c = channel_of(i * 4, inner, channels);
    const float sc = s[c], zc = z[c];
    const float4 xv = x[i], gv = g[i];
    float4 o;
    o.x = inside_one(xv.x, sc, zc, lo, hi) ? gv.x : 0.0f;
    o.y = inside_one(xv.y, sc, zc, lo, hi) ? gv.y : 0.0f;
    o.z = inside_one(xv.z, sc, zc, lo, hi) ? gv.z : 0.0f;
    o.w = inside_one(xv.w, sc, zc, lo, hi) ? gv.w : 0.0f;
    gx[i] = o;
  }
}

bool vec4_ok(const View& v, const at::Tensor& a, const at::Tensor& b) {
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return v.x.scalar_type() == at::kFloat && v.x.numel() % 4 == 0 && (v.channels == 1 || v.inner % 4 == 0) &&
         aligned(a) && aligned(b);
}

#define MCT_FX_DISPATCH(T, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, "mct_fx", __VA_ARGS__)

void check(const at::Tensor& x, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x.is_cuda(), "mct_fx: CUDA kernel got a ", x.device(), " tensor");
  TORCH_CHECK(qmin <= qmax, "mct_fx: qmin ", qmin, " > qmax ", qmax);
}

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                           int64_t qmax, std::optional<int64_t> axis) {
  check(x, qmin, qmax);
  const c10::cuda::CUDAGuard guard(x.device());
  View v = memory_view(x, axis);
  at::Tensor s = params_of(scale.to(x.device()), v, "scale"), z = params_of(zero_point.to(x.device()), v, "zero_point");
  at::Tensor y = at::empty_like(v.x);
  const int64_t n = v.x.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vec4_ok(v, v.x, y) && n / 4 < INT32_MAX) {
    fq_kernel_vec4<int32_t><<<blocks_for(n / 4), kThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(v.x.data_ptr<float>()), reinterpret_cast<float4*>(y.data_ptr<float>()),
        static_cast<int32_t>(n / 4), static_cast<int32_t>(v.inner), static_cast<int32_t>(v.channels),
        s.data_ptr<float>(), z.data_ptr<float>(), static_cast<float>(qmin), static_cast<float>(qmax));
  } else {
    MCT_FX_DISPATCH(x.scalar_type(), [&] {
      using A = compute_t<scalar_t>;
      with_index_type(n, [&](auto index) {
        using I = decltype(index);
        fq_kernel<scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
            v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), I(n), I(v.inner), I(v.channels), s.data_ptr<A>(),
            z.data_ptr<A>(), static_cast<A>(qmin), static_cast<A>(qmax));
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor ste_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
  check(x, qmin, qmax);
  const c10::cuda::CUDAGuard guard(x.device());
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale.to(x.device()), v, "scale"), z = params_of(zero_point.to(x.device()), v, "zero_point");
  at::Tensor gx = at::empty_like(v.x);
  const int64_t n = v.x.numel();
  if (n == 0) return gx;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vec4_ok(v, v.x, g) && vec4_ok(v, gx, gx) && n / 4 < INT32_MAX) {
    ste_kernel_vec4<int32_t><<<blocks_for(n / 4), kThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(g.data_ptr<float>()), reinterpret_cast<const float4*>(v.x.data_ptr<float>()),
        reinterpret_cast<float4*>(gx.data_ptr<float>()), static_cast<int32_t>(n / 4),
        static_cast<int32_t>(v.inner), static_cast<int32_t>(v.channels), s.data_ptr<float>(), z.data_ptr<float>(),
        static_cast<float>(qmin), static_cast<float>(qmax));
  } else {
    MCT_FX_DISPATCH(x.scalar_type(), [&] {
      using A = compute_t<scalar_t>;
      with_index_type(n, [&](auto index) {
        using I = decltype(index);
        ste_kernel<scalar_t, I><<<blocks_for(n), kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), v.x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), I(n), I(v.inner),
            I(v.channels), s.data_ptr<A>(), z.data_ptr<A>(), static_cast<A>(qmin), static_cast<A>(qmax));
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

// ------------------------------------------------------------------------ LSQ

// grid: (blocks, channels).  Block (b, c) covers elements j = b*blockDim + t (grid-stride) of
// channel c, j in [0, outer * inner): position (j / inner) * channels * inner + c * inner + j % inner.
// One element of the LSQ backward: returns the STE gradient of x, adds the scale / zero-point terms.
template <typename A>
__device__ __forceinline__ A lsq_one(A gi, A xi, A sc, A zc, A lo, A hi, double& acc_s, double& acc_z) {
  const A v = xi / sc;
  const A r = rint_(v);
  const A q = r + zc;
  const bool below = q < lo, above = q > hi;
  const bool inside = !(below || above);
  acc_s += static_cast<double>(gi * (inside ? r - v : (below ? lo : hi) - zc));
  acc_z += inside ? 0.0 : static_cast<double>(-(gi * sc));
  return inside ? gi : A(0);
}

__device__ __forceinline__ float4 lsq_four(float4 gv, float4 xv, float sc, float zc, float lo, float hi,
                                           double& acc_s, double& acc_z) {
  float4 o;
  o.x = lsq_one(gv.x, xv.x, sc, zc, lo, hi, acc_s, acc_z);
  o.y = lsq_one(gv.y, xv.y, sc, zc, lo, hi, acc_s, acc_z);
  o.z = lsq_one(gv.z, xv.z, sc, zc, lo, hi, acc_s, acc_z);
  o.w = lsq_one(gv.w, xv.w, sc, zc, lo, hi, acc_s, acc_z);
  return o;
}

// Sum the block's partial sums in shared memory; thread 0 adds them to channel c's totals.
__device__ __forceinline__ void lsq_block_sum(double acc_s, double acc_z, double* gs, double* gz, int64_t c) {
  __shared__ double sh_s[kThreads], sh_z[kThreads];
  sh_s[threadIdx.x] = acc_s;
  sh_z[threadIdx.x] = acc_z;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (threadIdx.x < k) {
      sh_s[threadIdx.x] += sh_s[threadIdx.x + k];
      sh_z[threadIdx.x] += sh_z[threadIdx.x + k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(gs + c, sh_s[0]);
    atomicAdd(gz + c, sh_z[0]);
  }
}

// Position of the j-th element of channel c in the [outer, channels, inner] memory view.
template <typename I>
__device__ __forceinline__ I channel_element(I j, I c, I inner, I channels) {
  if (channels == 1) return j;
  const I o = j / inner;
  return (o * channels + c) * inner + (j - o * inner);
}

template <typename T, typename I>
__global__ void lsq_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx, I per_channel,
                           I inner, I channels, const compute_t<T>* __restrict__ s,
                           const compute_t<T>* __restrict__ z, compute_t<T> lo, compute_t<T> hi,
                           double* __restrict__ gs, double* __restrict__ gz) {
  using A = compute_t<T>;
  const I c = blockIdx.y;
  const A sc = s[c], zc = z[c];
  double acc_s = 0.0, acc_z = 0.0;
  for (I j = blockIdx.x * I(blockDim.x) + threadIdx.x; j < per_channel; j += I(blockDim.x) * gridDim.x) {
    const I i = channel_element(j, c, inner, channels);
    const A gi = lsq_one(static_cast<A>(g[i]), static_cast<A>(x[i]), sc, zc, lo, hi, acc_s, acc_z);
    gx[i] = static_cast<T>(gi);  // g[i] or 0: exact in T
  }
  lsq_block_sum(acc_s, acc_z, gs, gz, c);
}

// float32, 16-byte aligned, each channel's runs a multiple of 4 long: float4 loads and stores
// (4x the bytes in flight per thread; the scalar kernel reached about half the copy bandwidth).
template <typename I>
__global__ void lsq_kernel_vec4(const float4* __restrict__ g, const float4* __restrict__ x, float4* __restrict__ gx,
                                I per_channel4, I inner4, I channels, const float* __restrict__ s,
                                const float* __restrict__ z, float lo, float hi, double* __restrict__ gs,
                                double* __restrict__ gz) {
  const I c = blockIdx.y;
  const float sc = s[c], zc = z[c];
  double acc_s = 0.0, acc_z = 0.0;
  for (I j = blockIdx.x * I(blockDim.x) + threadIdx.x; j < per_channel4; j += I(blockDim.x) * gridDim.x) {
    const I i = channel_element(j, c, inner4, channels);
    gx[i] = lsq_four(g[i], x[i], sc, zc, lo, hi, acc_s, acc_z);
  }
  lsq_block_sum(acc_s, acc_z, gs, gz, c);
}

// Per-channel float32 LSQ with rows of at least 16 float4s: one warp per row of the
// [outer * channels, inner] view, coalesced along the row.  Warps step over rows by n_warps, a
// multiple of the channel count, so each warp stays on one channel and sums it in registers
// (the channel-major grid above strides across rows: about 2/3 of the copy bandwidth on an H200).
template <typename I>
__global__ void lsq_rows_vec4(const float4* __restrict__ g, const float4* __restrict__ x, float4* __restrict__ gx,
                              I rows, I inner4, I channels, I n_warps, const float* __restrict__ s,
                              const float* __restrict__ z, float lo, float hi, double* __restrict__ gs,
                              double* __restrict__ gz) {
  const I warp = (blockIdx.x * I(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n_warps) return;  // whole warps leave together: the shuffles below stay full-warp
  const I c = warp % channels;
  const float sc = s[c], zc = z[c];
  double acc_s = 0.0, acc_z = 0.0;
  for (I r = warp; r < rows; r += n_warps) {
    for (I k = r * inner4 + lane, end = (r + 1) * inner4; k < end; k += 32) {
      gx[k] = lsq_four(g[k], x[k], sc, zc, lo, hi, acc_s, acc_z);
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    acc_s += __shfl_down_sync(0xffffffffu, acc_s, off);
    acc_z += __shfl_down_sync(0xffffffffu, acc_z, off);
  }
  if (lane == 0) {
    atomicAdd(gs + c, acc_s);
    atomicAdd(gz + c, acc_z);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsq_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& scale,
                                                                  const at::Tensor& zero_point, int64_t qmin,
                                                                  int64_t qmax, std::optional<int64_t> axis) {
  check(x, qmin, qmax);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return {at::empty_like(x), at::zeros_like(scale), at::zeros_like(zero_point)};
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale.to(x.device()), v, "scale"), z = params_of(zero_point.to(x.device()), v, "zero_point");
  at::Tensor gx = at::empty_like(v.x);
  at::Tensor gs = at::zeros({v.channels}, x.options().dtype(at::kDouble));
  at::Tensor gz = at::zeros({v.channels}, x.options().dtype(at::kDouble));
  const int64_t per_channel = v.outer * v.inner;
  TORCH_CHECK(v.channels < 65536, "mct_fx: at most 65535 channels on CUDA, got ", v.channels);
  const bool vec4 = vec4_ok(v, v.x, g) && vec4_ok(v, gx, gx);  // per_channel % 4 == 0 follows
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t threads_needed = (vec4 ? per_channel / 4 : per_channel) + kThreads - 1;
  const int64_t bx = std::max<int64_t>(1, std::min<int64_t>(threads_needed / kThreads,
                                                            std::max<int64_t>(1, sms * 8 / v.channels)));
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(v.channels));
  if (vec4 && v.channels > 1 && v.inner >= 64) {
    const int64_t rows = v.outer * v.channels;
    const int64_t per_c = std::max<int64_t>(1, std::min<int64_t>(v.outer, sms * 64 / v.channels));
    const int64_t n_warps = per_c * v.channels;
    with_index_type(v.x.numel(), [&](auto index) {
      using I = decltype(index);
      lsq_rows_vec4<I><<<static_cast<unsigned>((n_warps * 32 + kThreads - 1) / kThreads), kThreads, 0,
                         at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const float4*>(g.data_ptr<float>()),
          reinterpret_cast<const float4*>(v.x.data_ptr<float>()), reinterpret_cast<float4*>(gx.data_ptr<float>()),
          I(rows), I(v.inner / 4), I(v.channels), I(n_warps), s.data_ptr<float>(), z.data_ptr<float>(),
          static_cast<float>(qmin), static_cast<float>(qmax), gs.data_ptr<double>(), gz.data_ptr<double>());
    });
  } else if (vec4) {
    with_index_type(v.x.numel(), [&](auto index) {
      using I = decltype(index);
      lsq_kernel_vec4<I><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const float4*>(g.data_ptr<float>()),
          reinterpret_cast<const float4*>(v.x.data_ptr<float>()), reinterpret_cast<float4*>(gx.data_ptr<float>()),
          I(per_channel / 4), I(v.inner / 4), I(v.channels),
          s.data_ptr<float>(), z.data_ptr<float>(), static_cast<float>(qmin), static_cast<float>(qmax),
          gs.data_ptr<double>(), gz.data_ptr<double>());
    });
  } else MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    with_index_type(v.x.numel(), [&](auto index) {
      using I = decltype(index);
      lsq_kernel<scalar_t, I><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), v.x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), I(per_channel), I(v.inner),
          I(v.channels), s.data_ptr<A>(), z.data_ptr<A>(), static_cast<A>(qmin), static_cast<A>(qmax),
          gs.data_ptr<double>(), gz.data_ptr<double>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gs.to(scale.scalar_type()).reshape(scale.sizes()),
          gz.to(zero_point.scalar_type()).reshape(zero_point.sizes())};
}

// ------------------------------------------------------------------------ LUT

template <typename T>
__global__ void lut_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t inner, int64_t channels,
                           const compute_t<T>* __restrict__ s, const compute_t<T>* __restrict__ c, int64_t k) {
  using A = compute_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const A si = s[channel_of(i, inner, channels)];
    A v = static_cast<A>(x[i]) / si;
    if (isnan(v)) {
      y[i] = static_cast<T>(v);
      continue;
    }
    v = v < c[0] ? c[0] : (v > c[k - 1] ? c[k - 1] : v);
    int64_t best = 0;
    A best_d = fabs(v - c[0]);
    for (int64_t j = 1; j < k; ++j) {
      const A d = fabs(v - c[j]);
      if (d < best_d) {
        best_d = d;
        best = j;
      }
    }
    y[i] = static_cast<T>(c[best] * si);
  }
}

template <typename T>
__global__ void lut_ste_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx, int64_t n,
                               int64_t inner, int64_t channels, const compute_t<T>* __restrict__ s,
                               const compute_t<T>* __restrict__ c, int64_t k) {
  using A = compute_t<T>;
  const A c_lo = c[0], c_hi = c[k - 1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const A v = static_cast<A>(x[i]) / s[channel_of(i, inner, channels)];
    gx[i] = (v >= c_lo && v <= c_hi) ? g[i] : static_cast<T>(0.0f);
  }
}

at::Tensor sorted_centers(const at::Tensor& centers, const at::Tensor& x) {
  at::Tensor c = std::get<0>(centers.to(x.device(), compute_type(x.scalar_type())).reshape({-1}).sort()).contiguous();
  TORCH_CHECK(c.numel() >= 1, "mct_fx: a LUT needs at least one center");
  return c;
}

at::Tensor lut_cuda(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& scale,
                    std::optional<int64_t> axis) {
  check(x, 0, 0);
  const c10::cuda::CUDAGuard guard(x.device());
  View v = memory_view(x, axis);
  at::Tensor s = params_of(scale.to(x.device()), v, "scale"), c = sorted_centers(centers, x);
  at::Tensor y = at::empty_like(v.x);
  const int64_t n = v.x.numel();
  if (n == 0) return y;
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    lut_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, v.inner, v.channels, s.data_ptr<A>(), c.data_ptr<A>(),
        c.numel());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor lut_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& centers,
                             const at::Tensor& scale, std::optional<int64_t> axis) {
  check(x, 0, 0);
  const c10::cuda::CUDAGuard guard(x.device());
  View v = memory_view(x, axis);
  at::Tensor g = like_layout(grad.to(x.scalar_type()), v.x);
  at::Tensor s = params_of(scale.to(x.device()), v, "scale"), c = sorted_centers(centers, x);
  at::Tensor gx = at::empty_like(v.x);
  const int64_t n = v.x.numel();
  if (n == 0) return gx;
  MCT_FX_DISPATCH(x.scalar_type(), [&] {
    using A = compute_t<scalar_t>;
    lut_ste_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), v.x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n, v.inner, v.channels,
        s.data_ptr<A>(), c.data_ptr<A>(), c.numel());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mct_fx, CUDA, m) {
  m.impl("fake_quant", &fake_quant_cuda);
  m.impl("fake_quant_backward", &ste_backward_cuda);
  m.impl("fake_quant_lsq_backward", &lsq_backward_cuda);
  m.impl("fake_quant_lut", &lut_cuda);
  m.impl("fake_quant_lut_backward", &lut_backward_cuda);
}
