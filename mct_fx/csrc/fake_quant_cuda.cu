// Fused fake-quantize kernels for CUDA: the same ops and arithmetic as the CPU kernels
// (fake_quant_cpu.cpp) and the pure-torch reference (mct_fx/kernels.py):
//   q = clamp(rint(x / s) + z, qmin, qmax);  y = (q - z) * s
// in float32 (float64 for float64 inputs), IEEE division (no fast math), NaN passes.
//
// Elementwise kernels walk memory order, one pass per direction; the channel of
// element i of the [outer, channels, inner] memory view is (i / inner) % channels.
// Float32 tensors use 16-byte (float4) loads and stores when aligned.  The LSQ
// backward reduces the scale / zero-point gradients in the kernel (float64 sums in
// registers, one block reduction, atomic adds per channel); its grid is one wave of
// resident blocks, and per-channel tensors whose [channels, inner] slab fits in that wave
// are walked in memory order with a fixed channel per thread (lsq_slab_kernel).

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

// One element of the LSQ backward: returns the STE gradient of x, adds the scale / zero-point terms.
template <typename A>
__device__ __forceinline__ A lsq_one(A gi, A xi, A sc, A zc, A lo, A hi, double& acc_s, double& acc_z) {
  const A v = xi / sc;
  const A r = rint_(v);
  const A q = r + zc;
  const bool inside = q >= lo && q <= hi;  // NaN is outside, as in the reference
  acc_s += static_cast<double>(gi * (inside ? r - v : (q < lo ? lo : hi) - zc));
  if (!inside) acc_z -= static_cast<double>(gi * sc);  // the float -> double conversion only where needed
  return inside ? gi : A(0);
}

// A unit of the LSQ walk: one value of T, or four float32 (float4: 16-byte loads and stores).
template <typename T>
__device__ __forceinline__ T lsq_unit(T g, T x, compute_t<T> sc, compute_t<T> zc, compute_t<T> lo, compute_t<T> hi,
                                      double& acc_s, double& acc_z) {
  using A = compute_t<T>;
  return static_cast<T>(lsq_one<A>(static_cast<A>(g), static_cast<A>(x), sc, zc, lo, hi, acc_s, acc_z));  // g or 0
}

__device__ __forceinline__ float4 lsq_unit(float4 g, float4 x, float sc, float zc, float lo, float hi, double& acc_s,
                                           double& acc_z) {
  return {lsq_one(g.x, x.x, sc, zc, lo, hi, acc_s, acc_z), lsq_one(g.y, x.y, sc, zc, lo, hi, acc_s, acc_z),
          lsq_one(g.z, x.z, sc, zc, lo, hi, acc_s, acc_z), lsq_one(g.w, x.w, sc, zc, lo, hi, acc_s, acc_z)};
}

// Block reduction of per-thread sums keyed by `key` (non-decreasing with the thread index,
// in [0, kThreads)): a segmented warp reduction leaves each key's sum in the first lane that
// holds it, those lanes add into shared memory, and thread k < keys adds key k's total to
// channel `channel_of_key(k)`.
template <typename F>
__device__ __forceinline__ void lsq_block_sum(double acc_s, double acc_z, int key, int keys, F channel_of_key,
                                              double* gs, double* gz) {
  __shared__ double sh_s[kThreads], sh_z[kThreads];
  sh_s[threadIdx.x] = 0.0;
  sh_z[threadIdx.x] = 0.0;
  const int lane = threadIdx.x % 32;
  for (int off = 1; off < 32; off *= 2) {
    const double os = __shfl_down_sync(0xffffffffu, acc_s, off), oz = __shfl_down_sync(0xffffffffu, acc_z, off);
    const int ok = __shfl_down_sync(0xffffffffu, key, off);
    if (lane + off < 32 && ok == key) {
      acc_s += os;
      acc_z += oz;
    }
  }
  const int before = __shfl_up_sync(0xffffffffu, key, 1);
  __syncthreads();
  if (lane == 0 || before != key) {
    atomicAdd(sh_s + key, acc_s);
    atomicAdd(sh_z + key, acc_z);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < keys) {
    const auto c = channel_of_key(static_cast<int>(threadIdx.x));
    atomicAdd(gs + c, sh_s[threadIdx.x]);
    atomicAdd(gz + c, sh_z[threadIdx.x]);
  }
}

constexpr int kUnroll = 2;  // units loaded per thread before any is computed (bytes in flight)

// Per-tensor, or per-channel with long rows: block (b, c) walks channel c's units in memory
// order: unit j of the channel is column j % inner of its row j / inner, at
// (row * channels + c) * inner + column of the [outer, channels, inner] view.  Threads step j
// by the grid's width, carrying (row, column) instead of dividing, and load kUnroll units
// before computing any.
template <typename V, typename I>
__global__ void __launch_bounds__(kThreads) lsq_channel_kernel(const V* __restrict__ g, const V* __restrict__ x,
                                                              V* __restrict__ gx, I outer, I inner, I channels,
                                                              const compute_t<V>* __restrict__ s,
                                                              const compute_t<V>* __restrict__ z, compute_t<V> lo,
                                                              compute_t<V> hi, double* __restrict__ gs,
                                                              double* __restrict__ gz) {
  const int c = blockIdx.y;
  const auto sc = s[c], zc = z[c];
  const I width = I(gridDim.x) * kThreads, step_row = width / inner, step_col = width % inner;
  const I j = I(blockIdx.x) * kThreads + threadIdx.x;
  I row = j / inner, col = j % inner;
  double acc_s = 0.0, acc_z = 0.0;
  while (row < outer) {
    I pos[kUnroll];
    V gv[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pos[u] = row < outer ? (row * channels + c) * inner + col : I(-1);
      col += step_col;
      row += step_row + (col >= inner ? 1 : 0);
      col -= col >= inner ? inner : I(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (pos[u] >= 0) {
        gv[u] = g[pos[u]];
        xv[u] = x[pos[u]];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (pos[u] >= 0) gx[pos[u]] = lsq_unit(gv[u], xv[u], sc, zc, lo, hi, acc_s, acc_z);
    }
  }
  lsq_block_sum(acc_s, acc_z, 0, 1, [c](int) { return c; }, gs, gz);
}

// Per-channel with short rows: the grid's width is a whole number of slabs (one outer index:
// channels * inner units), so thread j's units j, j + width, ... all lie in channel
// (j / inner) % channels.  The walk is in memory order (coalesced, no index arithmetic), the
// sums stay in registers, and each block reduces once by row.  (A channel-major walk of rows
// this short reached about 72% of the copy bandwidth on an H200.)
template <typename V, typename I>
__global__ void __launch_bounds__(kThreads) lsq_slab_kernel(const V* __restrict__ g, const V* __restrict__ x,
                                                           V* __restrict__ gx, I n, I width, I inner, I channels,
                                                           const compute_t<V>* __restrict__ s,
                                                           const compute_t<V>* __restrict__ z, compute_t<V> lo,
                                                           compute_t<V> hi, double* __restrict__ gs,
                                                           double* __restrict__ gz) {
  const I first = I(blockIdx.x) * kThreads, j = first + threadIdx.x;
  const I first_row = first / inner, row = j / inner;  // row - first_row < kThreads
  double acc_s = 0.0, acc_z = 0.0;
  if (j < width) {
    const I c = row % channels;
    const auto sc = s[c], zc = z[c];
    for (I i = j; i < n; i += width * kUnroll) {
      V gv[kUnroll], xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * width < n) {
          gv[u] = g[i + u * width];
          xv[u] = x[i + u * width];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * width < n) gx[i + u * width] = lsq_unit(gv[u], xv[u], sc, zc, lo, hi, acc_s, acc_z);
      }
    }
  }
  const I last = (first + kThreads < width ? first + kThreads : width) - 1;
  lsq_block_sum(acc_s, acc_z, static_cast<int>(row - first_row), static_cast<int>(last / inner - first_row + 1),
                [=](int k) { return (first_row + k) % channels; }, gs, gz);
}

// Resident blocks of `kernel` per SM (the same on every device of one architecture).
template <typename K>
int64_t blocks_per_sm(K kernel) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return std::max(per_sm, 1);
}

// One wave of resident blocks where the work divides evenly into it; a grid that leaves a
// second, partial wave runs at a fraction of the bandwidth.
template <typename V, typename I>
void launch_lsq(const V* g, const V* x, V* gx, const View& v, int64_t per_unit, const compute_t<V>* s,
                const compute_t<V>* z, int64_t qmin, int64_t qmax, double* gs, double* gz) {
  using A = compute_t<V>;
  static const int64_t slab_per_sm = blocks_per_sm(lsq_slab_kernel<V, I>);
  static const int64_t channel_per_sm = blocks_per_sm(lsq_channel_kernel<V, I>);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slab_blocks = slab_per_sm * sms, channel_blocks = channel_per_sm * sms;
  const int64_t inner = v.inner / per_unit, n = v.outer * v.channels * inner, slab = v.channels * inner;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (v.channels > 1 && slab <= slab_blocks * kThreads) {
    const int64_t width = std::min(n, slab_blocks * kThreads / slab * slab);
    lsq_slab_kernel<V, I><<<static_cast<unsigned>((width + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        g, x, gx, I(n), I(width), I(inner), I(v.channels), s, z, static_cast<A>(qmin), static_cast<A>(qmax), gs, gz);
    return;
  }
  TORCH_CHECK(v.channels < 65536, "mct_fx: the CUDA LSQ backward takes at most 65535 channels when a slab of ",
              "channels * inner values exceeds a wave of blocks; got ", v.channels, " channels of ", v.inner);
  // blocks per channel: one wave if that gives each channel at least 4, else about 4 waves
  const int64_t per_channel = v.outer * inner, wave = channel_blocks / v.channels;
  const int64_t bx = std::max<int64_t>(1, std::min(wave >= 4 ? wave : (4 * channel_blocks + v.channels - 1) / v.channels,
                                                   (per_channel + kThreads - 1) / kThreads));
  lsq_channel_kernel<V, I><<<dim3(static_cast<unsigned>(bx), static_cast<unsigned>(v.channels)), kThreads, 0,
                             stream>>>(g, x, gx, I(v.outer), I(inner), I(v.channels), s, z, static_cast<A>(qmin),
                                       static_cast<A>(qmax), gs, gz);
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
  with_index_type(v.x.numel(), [&](auto index) {
    using I = decltype(index);
    if (vec4_ok(v, v.x, g) && vec4_ok(v, gx, gx)) {
      launch_lsq<float4, I>(reinterpret_cast<const float4*>(g.data_ptr<float>()),
                            reinterpret_cast<const float4*>(v.x.data_ptr<float>()),
                            reinterpret_cast<float4*>(gx.data_ptr<float>()), v, 4, s.data_ptr<float>(),
                            z.data_ptr<float>(), qmin, qmax, gs.data_ptr<double>(), gz.data_ptr<double>());
    } else {
      MCT_FX_DISPATCH(x.scalar_type(), [&] {
        using A = compute_t<scalar_t>;
        launch_lsq<scalar_t, I>(g.data_ptr<scalar_t>(), v.x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), v, 1,
                                s.data_ptr<A>(), z.data_ptr<A>(), qmin, qmax, gs.data_ptr<double>(),
                                gz.data_ptr<double>());
      });
    }
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
