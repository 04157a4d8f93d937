"""The CUDA kernels and the workflows on a GPU (skipped without one; run by benchmarks/device_check.sh).

The hypothesis tests in test_kernel_ops.py draw CUDA too, on tensors of at most a few hundred
values; these tests add tensors large enough for many blocks, the float4 path and both LSQ
walks with their cross-block sums, and run each workflow end to end on the GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx import kernels
from mct_fx.demo import load_model, load_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPE = (6, 48, 37, 20)  # 213k values: many blocks; inner 740 (float4 per channel) or 37*20*6 (generic)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(0, 3).contiguous().transpose(0, 3)
    if layout == "misaligned":  # dense, 4 bytes past a 16-byte boundary: the scalar path
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "misaligned"])
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_large_tensors_match_the_reference_bit_for_bit(dtype, layout, axis):
    g = torch.Generator().manual_seed(hash((str(dtype), layout, axis)) % 2**31)
    channels = 1 if axis is None else SHAPE[axis]
    scale = torch.rand(channels, generator=g) * 0.05 + 0.01
    zp = torch.randint(-20, 20, (channels,), generator=g).float()
    if axis is None:
        scale, zp = scale[0], zp[0]
    xc = _layout((torch.randn(SHAPE, generator=g) * 4).to(dtype).cuda(), layout)  # the layout made on the GPU
    grad = torch.randn(SHAPE, generator=g).to(dtype)
    x, gc, sc, zc = xc.cpu(), grad.cuda(), scale.cuda(), zp.cuda()
    assert (xc.storage_offset() == 1) == (layout == "misaligned")
    _same(kernels.fake_quant(xc, sc, zc, -128, 127, axis), kernels.reference_fake_quant(x, scale, zp, -128, 127, axis))
    _same(torch.ops.mct_fx.fake_quant_backward(gc, xc, sc, zc, -128, 127, axis),
          kernels.reference_fake_quant_backward(grad, x, scale, zp, -128, 127, axis))
    gx, gs, gz = torch.ops.mct_fx.fake_quant_lsq_backward(gc, xc, sc, zc, -128, 127, axis)
    rx, rs, rz = kernels.reference_fake_quant_lsq_backward(grad, x, scale, zp, -128, 127, axis)
    _same(gx, rx)
    torch.testing.assert_close(gs.cpu(), rs, rtol=1e-5, atol=1e-4)  # many-block float64 sums, another order
    torch.testing.assert_close(gz.cpu(), rz, rtol=1e-5, atol=1e-4)
    centers = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0])
    _same(kernels.fake_quant_lut(xc, centers.cuda(), sc, axis),
          kernels.reference_fake_quant_lut(x, centers, scale, axis))


def test_lsq_sums_equal_float64_sums_of_the_same_terms():
    """Per-channel LSQ over 4M values: the kernel's cross-block sums against float64 torch sums."""
    x = torch.randn(64, 16, 64, 64, device="cuda") * 3
    grad = torch.randn_like(x)
    scale, zp = torch.rand(16, device="cuda") * 0.02 + 0.01, torch.zeros(16, device="cuda")
    _, gs, gz = torch.ops.mct_fx.fake_quant_lsq_backward(grad, x, scale, zp, -128, 127, 1)
    _, rs, rz = kernels.reference_fake_quant_lsq_backward(grad, x, scale, zp, -128, 127, 1)
    torch.testing.assert_close(gs, rs, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(gz, rz, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("inner", [4096, 4097])  # float4 units / scalar units
def test_lsq_channel_major_walk_matches_the_reference(inner):
    """Per-channel slabs ([channels, inner] of one outer index) larger than a wave of blocks
    take the channel-major LSQ walk; the tests above (small slabs) take the memory-order one."""
    gen = torch.Generator().manual_seed(inner)
    x = torch.randn(2, 512, inner, generator=gen) * 3
    grad = torch.randn(x.shape, generator=gen)
    scale = torch.rand(512, generator=gen) * 0.02 + 0.01
    zp = torch.randint(-5, 5, (512,), generator=gen).float()
    gx, gs, gz = torch.ops.mct_fx.fake_quant_lsq_backward(grad.cuda(), x.cuda(), scale.cuda(), zp.cuda(), -128, 127, 1)
    rx, rs, rz = kernels.reference_fake_quant_lsq_backward(grad, x, scale, zp, -128, 127, 1)
    _same(gx, rx)
    torch.testing.assert_close(gs.cpu(), rs, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(gz.cpu(), rz, rtol=1e-9, atol=1e-6)


@pytest.fixture(scope="module")
def demo_on_gpu():
    calib, images, labels = load_samples()
    return load_model().cuda(), calib.cuda(), images.cuda(), labels.cuda()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean()) * 100


def test_workflows_run_on_the_gpu(demo_on_gpu):
    model, calib, images, labels = demo_on_gpu
    float_acc = _accuracy(model, images, labels)
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    assert all(p.is_cuda for p in q.parameters()) and all(b.is_cuda for b in q.buffers())
    assert _accuracy(q, images, labels) > float_acc - 2
    g = mct_fx.gptq(model, calib, "imx500", mct_fx.GPTQConfig(epochs=2), verbose=False)
    assert _accuracy(g, images, labels) > float_acc - 2
    qat = mct_fx.qat_prepare(model, calib, "imx500", verbose=False)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(qat(images[:64]), labels[:64])
    loss.backward()
    opt.step()
    assert any(p.grad is not None and p.grad.is_cuda for p in qat.parameters())


def test_data_generation_on_the_gpu_lowers_the_bn_loss(demo_on_gpu):
    model = demo_on_gpu[0]
    history = []
    config = mct_fx.DataGenConfig(n_iter=40, batch_size=32, normalization="none", extra_pixels=4)  # bf16 autocast
    out = mct_fx.generate_data(model, 64, (1, 28, 28), config, verbose=False,
                               on_iteration=lambda i, bn, o: history.append(bn))
    assert out.is_cuda and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert history[-1] < history[0] / 5


def test_inductor_compiles_a_quantized_model_on_the_gpu(demo_on_gpu):
    model, calib, images, _ = demo_on_gpu
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    with torch.no_grad():
        ref, out = q(images[:256]), torch.compile(q, fullgraph=True)(images[:256])
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.98
