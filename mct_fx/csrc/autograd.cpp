// Autograd of the fake-quant ops, for every device: the straight-through gradient of x from
// the saved input (fake_quant_backward), plus the LSQ gradients of the scale and zero point
// when those require grad (fake_quant_lsq_backward); the LUT op's STE gradient.  The same
// rules as the Python registration in mct_fx/kernels.py, which serves the pure-torch
// reference; here a forward + backward costs the host about what torch's own fake-quantize
// does (the Python registration about three times that).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FakeQuantFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                               std::optional<int64_t>);
using SteFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                         std::optional<int64_t>);
using LsqFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, int64_t, int64_t,
                                                             std::optional<int64_t>);
using LutFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>);
using LutBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 std::optional<int64_t>);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The forward ops below autograd (the device kernels).
at::Tensor fake_quant_below(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                            int64_t qmax, std::optional<int64_t> axis) {
  static const auto fake_quant = op<FakeQuantFn>("mct_fx::fake_quant");
  at::AutoDispatchBelowADInplaceOrView below;
  return fake_quant.call(x, scale, zero_point, qmin, qmax, axis);
}

at::Tensor lut_below(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& scale,
                     std::optional<int64_t> axis) {
  static const auto lut = op<LutFn>("mct_fx::fake_quant_lut");
  at::AutoDispatchBelowADInplaceOrView below;
  return lut.call(x, centers, scale, axis);
}

std::optional<int64_t> axis_of(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<int64_t>(v.toInt());
}

struct FakeQuant : public torch::autograd::Function<FakeQuant> {
  static constexpr bool is_traceable = true;  // backward calls dispatcher ops only: compiled autograd traces it
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
    ctx->save_for_backward({x, scale, zero_point});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["axis"] = axis;
    return fake_quant_below(x, scale, zero_point, qmin, qmax, axis);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto ste = op<SteFn>("mct_fx::fake_quant_backward");
    static const auto lsq = op<LsqFn>("mct_fx::fake_quant_lsq_backward");
    const auto saved = ctx->get_saved_variables();
    const int64_t qmin = ctx->saved_data["qmin"].toInt(), qmax = ctx->saved_data["qmax"].toInt();
    const auto axis = axis_of(ctx->saved_data["axis"]);
    const bool wants_s = ctx->needs_input_grad(1), wants_z = ctx->needs_input_grad(2);
    const at::Tensor none;
    if (wants_s || wants_z) {
      auto [gx, gs, gz] = lsq.call(grads[0], saved[0], saved[1], saved[2], qmin, qmax, axis);
      return {gx, wants_s ? gs : none, wants_z ? gz : none, none, none, none};
    }
    return {ste.call(grads[0], saved[0], saved[1], saved[2], qmin, qmax, axis), none, none, none, none, none};
  }
};

struct FakeQuantLut : public torch::autograd::Function<FakeQuantLut> {
  static constexpr bool is_traceable = true;
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& centers,
                            const at::Tensor& scale, std::optional<int64_t> axis) {
    ctx->save_for_backward({x, centers, scale});
    ctx->saved_data["axis"] = axis;
    return lut_below(x, centers, scale, axis);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto lut_backward = op<LutBackwardFn>("mct_fx::fake_quant_lut_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor none;
    return {lut_backward.call(grads[0], saved[0], saved[1], saved[2], axis_of(ctx->saved_data["axis"])), none,
            none, none};
  }
};

// No graph to record (inference, calibration): straight to the kernel, no node, nothing saved.
bool records(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs)
    if (t.requires_grad()) return true;
  return false;
}

at::Tensor fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                               int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
  if (records({x, scale, zero_point})) return FakeQuant::apply(x, scale, zero_point, qmin, qmax, axis);
  return fake_quant_below(x, scale, zero_point, qmin, qmax, axis);
}

at::Tensor fake_quant_lut_autograd(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& scale,
                                   std::optional<int64_t> axis) {
  if (records({x, centers, scale})) return FakeQuantLut::apply(x, centers, scale, axis);
  return lut_below(x, centers, scale, axis);
}

}  // namespace

TORCH_LIBRARY_IMPL(mct_fx, Autograd, m) {
  m.impl("fake_quant", &fake_quant_autograd);
  m.impl("fake_quant_lut", &fake_quant_lut_autograd);
}
