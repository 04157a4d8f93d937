"""Fake-quant kernel speed: mct_fx ops vs torch's own fake-quantize ops, in the same run.

    python benchmarks/kernels.py [--sizes 1e5,1e6,1e7] [--device cpu|cuda]

For each size (float32 elements), per-tensor and per-channel (64 channels, axis 1),
the table prints milliseconds per call, effective GB/s (bytes read + written per
element, counted per implementation: mct_fx reads x and writes y forward and
reads grad and x, writes grad_x backward; torch's ops also write and read a
1-byte mask) and the speed ratio torch / mct_fx (> 1: mct_fx faster).  Rows:

* ``fwd``: forward only (no grad);
* ``fwd+bwd``: forward and STE backward through autograd;
* ``lsq fwd+bwd``: with learnable scale and zero point, against
  ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``.

Each backward starts from ``grad = None`` (no accumulation pass).  On CUDA a call's time is
that of a batch of back-to-back calls between device events, divided by the batch (the GPU's
throughput; where the host cannot keep up, as for small tensors with a backward, the host's
time per call shows instead).  On CUDA each size also
times a device-to-device copy (8 bytes per element: the memory system's practical peak)
and the ``of copy`` column is mct_fx's GB/s over it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mct_fx import kernels

CHANNELS, QMIN, QMAX = 64, -128, 127
BYTES = {  # per element, read + written
    "fwd": {"mct_fx": 8, "torch": 8},
    "fwd+bwd": {"mct_fx": 8 + 12, "torch": 9 + 9},
    "lsq fwd+bwd": {"mct_fx": 8 + 12, "torch": 8 + 12},
}


def _timeit(fn, device: str, min_time: float = 0.3) -> float:
    """Median seconds per call.  On CUDA: device events around batches of back-to-back calls,
    so launch and synchronisation latency stay out of the time (the GPU throughput)."""
    fn()
    batch = 1
    if device == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        batch = max(2, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        times.append(_batch_seconds(fn, batch, device) / batch)
    return statistics.median(times)


def _batch_seconds(fn, batch: int, device: str) -> float:
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        return time.perf_counter() - t0
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(batch):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def _cases(n: int, per_channel: bool, device: str):
    x = torch.randn(max(1, n // (CHANNELS * 100)), CHANNELS, 100, device=device) * 3
    g = torch.randn_like(x)
    if per_channel:
        scale = torch.rand(CHANNELS, device=device) * 0.02 + 0.01
        zp = torch.zeros(CHANNELS, device=device)
        axis = 1
    else:
        scale, zp, axis = torch.tensor(0.02, device=device), torch.tensor(0.0, device=device), None
    zp_int = zp.int()

    def ours_fwd():
        with torch.no_grad():
            kernels.fake_quant(x, scale, zp, QMIN, QMAX, axis)

    def torch_fwd():
        with torch.no_grad():
            if per_channel:
                torch.fake_quantize_per_channel_affine(x, scale, zp_int, 1, QMIN, QMAX)
            else:
                torch.fake_quantize_per_tensor_affine(x, 0.02, 0, QMIN, QMAX)

    xg = x.clone().requires_grad_(True)

    def ours_bwd():
        xg.grad = None
        kernels.fake_quant(xg, scale, zp, QMIN, QMAX, axis).backward(g)

    def torch_bwd():
        xg.grad = None
        if per_channel:
            torch.fake_quantize_per_channel_affine(xg, scale, zp_int, 1, QMIN, QMAX).backward(g)
        else:
            torch.fake_quantize_per_tensor_affine(xg, 0.02, 0, QMIN, QMAX).backward(g)

    s_l, z_l = scale.clone().requires_grad_(True), zp.clone().requires_grad_(True)
    s_t = (scale if per_channel else scale.reshape(1)).clone().requires_grad_(True)
    z_t = (zp if per_channel else zp.reshape(1)).clone().requires_grad_(True)

    def ours_lsq():
        xg.grad = s_l.grad = z_l.grad = None
        kernels.fake_quant(xg, s_l, z_l, QMIN, QMAX, axis).backward(g)

    def torch_lsq():
        xg.grad = s_t.grad = z_t.grad = None
        if per_channel:
            torch._fake_quantize_learnable_per_channel_affine(xg, s_t, z_t, 1, QMIN, QMAX, 1.0).backward(g)
        else:
            torch._fake_quantize_learnable_per_tensor_affine(xg, s_t, z_t, QMIN, QMAX, 1.0).backward(g)

    return x.numel(), {"fwd": (ours_fwd, torch_fwd), "fwd+bwd": (ours_bwd, torch_bwd),
                       "lsq fwd+bwd": (ours_lsq, torch_lsq)}


def _copy_bandwidth(n: int, device: str) -> float:
    """GB/s of a device-to-device copy of ``n`` float32 values (read + write)."""
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    return n * 8 / _timeit(lambda: y.copy_(x), device) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"mct_fx backend: {kernels.backend()}, device: {args.device}, threads: {torch.get_num_threads()}")
    print(f"{'elements':>9s} {'grid':11s} {'pass':12s} {'mct_fx ms':>10s} {'GB/s':>7s} "
          f"{'torch ms':>9s} {'GB/s':>7s} {'ratio':>6s} {'of copy':>7s}")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        copy_gb = _copy_bandwidth(size, args.device) if args.device == "cuda" else None
        if copy_gb:
            print(f"{size:9.0e} {'copy':11s} {'x -> y':12s} {'':>10s} {copy_gb:7.2f}")
        for per_channel in (False, True):
            n, cases = _cases(size, per_channel, args.device)
            for name, (ours, theirs) in cases.items():
                t_ours, t_torch = _timeit(ours, args.device), _timeit(theirs, args.device)
                gb_ours = n * BYTES[name]["mct_fx"] / t_ours / 1e9
                gb_torch = n * BYTES[name]["torch"] / t_torch / 1e9
                grid = "per-channel" if per_channel else "per-tensor"
                of_copy = f"{gb_ours / copy_gb:7.0%}" if copy_gb else ""
                print(f"{n:9.0e} {grid:11s} {name:12s} {t_ours * 1e3:10.3f} {gb_ours:7.2f} {t_torch * 1e3:9.3f} "
                      f"{gb_torch:7.2f} {t_torch / t_ours:6.2f} {of_copy}", flush=True)
            del cases, ours, theirs  # free the device memory before the next size


if __name__ == "__main__":
    main()
