"""Fake-quantize ops: hand-computed values, rounding rule, dtypes, gradient, backend selection."""

import os
import subprocess
import sys

import pytest
import torch

from mct_fx.kernels import backend, dequantize, fake_quant, quantize
from mct_fx.quantizers.params import int_range, pot_threshold, symmetric_params, uniform_params


def test_fused_cpu_kernels_are_in_use():
    # CI must exercise the compiled path: a machine with a C++ compiler builds it on first import
    assert "cpp" in backend().split("+")


def test_environment_forces_the_reference():
    # the reference backend registers its autograd from Python, the compiled one from C++: same rules
    code = ("import torch, mct_fx.kernels as k; "
            "x, s = torch.tensor([0.3, 9.0], requires_grad=True), torch.tensor(0.5, requires_grad=True); "
            "y = k.fake_quant(x, s, torch.tensor(0.0), -4, 3); y.sum().backward(); "
            "print(k.backend(), y.tolist(), x.grad.tolist(), round(s.grad.item(), 5))")
    out = {mode: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=dict(os.environ, MCT_FX_KERNELS=mode)).stdout.split() for mode in ("reference", "")}
    # 0.3 / 0.5 rounds to 1 (inside: d/ds = 1 - 0.6); 9 / 0.5 clamps to 3 (outside: d/ds = 3)
    assert out["reference"] == ["reference", "[0.5,", "1.5]", "[1.0,", "0.0]", "3.4"]
    assert out[""][0] == backend() and out[""][1:] == out["reference"][1:]


def test_pot_signed_8bit_hand_values():
    # threshold 1 -> scale 1/128, codes -128..127
    scale, zp = symmetric_params(pot_threshold(torch.tensor(0.9)), 8, signed=True)
    assert float(scale) == 1 / 128 and float(zp) == 0
    x = torch.tensor([0.0, 0.5, 1 / 256, 3 / 256, 0.99, 1.5, -1.0, -2.0])
    y = fake_quant(x, scale, zp, *int_range(8, True))
    # 1/256 = 0.5 step rounds half to even -> 0; 3/256 = 1.5 steps -> 2 steps
    expected = torch.tensor([0.0, 0.5, 0.0, 2 / 128, 127 / 128, 127 / 128, -1.0, -1.0])
    assert torch.equal(y, expected)


def test_symmetric_unsigned_4bit():
    scale, zp = symmetric_params(torch.tensor(3.0), 4, signed=False)  # 16 levels over [0, 3)
    assert float(scale) == pytest.approx(3 / 16)
    x = torch.tensor([-1.0, 0.1, 1.0, 2.9, 5.0])
    y = fake_quant(x, scale, zp, *int_range(4, False))
    expected = torch.tensor([0.0, 3 / 16, 5 * 3 / 16, 15 * 3 / 16, 15 * 3 / 16])  # 0.1/0.1875 rounds to 1
    assert torch.allclose(y, expected)


def test_uniform_range_contains_zero_exactly():
    scale, zp = uniform_params(torch.tensor(0.5), torch.tensor(2.0), 8)  # lo widened to 0
    assert float(zp) == 0 and float(scale) == pytest.approx(2 / 255)
    scale, zp = uniform_params(torch.tensor(-1.0), torch.tensor(3.0), 8)
    assert float(scale) == pytest.approx(4 / 255) and float(zp) == round(255 / 4)
    y = fake_quant(torch.tensor([0.0, -1.0, 3.0, 10.0]), scale, zp, *int_range(8, False))
    assert float(y[0]) == 0.0  # zero exactly representable
    assert float(y[3]) == pytest.approx(float((255 - zp) * scale))


def test_per_channel_axis():
    w = torch.tensor([[1.0, -1.0], [10.0, 5.0]]).T  # channels along axis 1
    scale = torch.tensor([1 / 128, 16 / 128])
    y = fake_quant(w, scale, torch.zeros(2), -128, 127, axis=1)
    assert torch.equal(y[:, 0], torch.tensor([127 / 128, -1.0]))
    assert torch.equal(y[:, 1], torch.tensor([10.0, 5.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x = torch.randn(64).to(dtype)
    scale, zp = torch.tensor(0.05), torch.tensor(0.0)
    y = fake_quant(x, scale, zp, -128, 127)
    assert y.dtype == dtype
    assert torch.equal(y, fake_quant(x.float(), scale, zp, -128, 127).to(dtype))


def test_quantize_dequantize_roundtrip():
    scale, zp = torch.tensor(0.1), torch.tensor(3.0)
    q = quantize(torch.tensor([0.0, 0.25, 100.0]), scale, zp, 0, 15)
    assert torch.equal(q, torch.tensor([3.0, 5.0, 15.0]))  # 0.25/0.1 = 2.5 -> 2 (half to even)
    assert torch.allclose(dequantize(q, scale, zp), torch.tensor([0.0, 0.2, 1.2]))


def test_ste_gradient_masked_outside_range():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(1 / 128), torch.tensor(0.0), -128, 127)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_bits_validated():
    with pytest.raises(ValueError, match="2..16"):
        int_range(1, True)
    assert int_range(16, True) == (-32768, 32767)
    assert int_range(2, False) == (0, 3)


def test_failed_build_warns_and_falls_back(tmp_path):
    # no compiler: the ops still run, on the reference, after one warning per device kind (CPU, and CUDA if present)
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import mct_fx.kernels as k\n"
            "print(k.backend(), sum('could not build' in str(x.message) for x in w))\n"
            "print(k.fake_quant(torch.tensor([0.3]), torch.tensor(0.5), torch.tensor(0.0), -4, 3).tolist())\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("MCT_FX_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    warnings = 1 + torch.cuda.is_available()
    assert out.split("\n")[:2] == [f"reference {warnings}", "[0.5]"]
