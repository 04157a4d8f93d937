"""Bit-for-bit fingerprints of what the workflows return, to check that a refactor changes nothing.

    python benchmarks/fingerprint.py --save before.json          # on the old code
    python benchmarks/fingerprint.py --check before.json         # on the new code: "all equal" or the cases that differ
    python benchmarks/fingerprint.py --check before.json --only ptq_default,gptq

Each case runs one workflow (PTQ variants, mixed precision, HMSE, TensorBoard, LUT, a derived
4-bit TPC, GPTQ, QAT, pruning, both exporters, compare, troubleshoot with verify) on a seeded
MobileNetV3-small (Hardswish: shift-negative grids) and hashes the result: every state_dict
tensor, the output on a fixed input, the exported file's bytes, or the reported numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

import mct_fx

SHAPE = (3, 64, 64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.train()
    with torch.no_grad():  # BN statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, *SHAPE) * 1.5 + 0.2)
    return model.eval()


def _loader() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, *SHAPE, generator=g) for _ in range(4)]


def _probe() -> torch.Tensor:
    return torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))


def _hash_model(gm: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(gm.state_dict().items()):
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(value).encode())
    with torch.no_grad():
        out = gm(_probe())
    h.update(out.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ptq(config: mct_fx.QuantConfig | None = None, tpc="imx500", **kw) -> Callable[[], str]:
    return lambda: _hash_model(mct_fx.quantize(_model(), _loader(), tpc, config, verbose=False, **kw))


def _mp() -> str:
    model = _model()
    full = mct_fx.resource_utilization(model, _loader()[0], "imx500")
    target = mct_fx.ResourceUtilization(weights_memory=full.weights_memory * 0.7)
    return _hash_model(mct_fx.quantize(model, _loader(), "imx500", target=target, verbose=False))


def _tb() -> str:
    with tempfile.TemporaryDirectory() as d:
        return _hash_model(mct_fx.quantize(_model(), _loader(), "imx500", mct_fx.QuantConfig(log_dir=d),
                                           verbose=False))


def _derived_w4(base: str) -> Callable[[], str]:
    def run() -> str:
        tpc = mct_fx.tpc.with_bits(mct_fx.get_tpc(base), weights=4)
        return _hash_model(mct_fx.quantize(_model(), _loader(), tpc, verbose=False))

    return run


def _mp_activations() -> str:
    model = _model()
    full = mct_fx.resource_utilization(model, _loader()[0], "imx500_16bit")
    target = mct_fx.ResourceUtilization(activation_memory=full.activation_memory * 1.2)
    return _hash_model(mct_fx.quantize(model, _loader(), "imx500_16bit", target=target, verbose=False))


def _gptq() -> str:
    config = mct_fx.GPTQConfig(epochs=1)
    return _hash_model(mct_fx.gptq(_model(), _loader(), "imx500", config, verbose=False))


def _qat() -> str:
    torch.manual_seed(3)
    qat = mct_fx.qat_prepare(_model(), _loader(), "imx500", verbose=False)
    return _hash_model(mct_fx.qat_finalize(qat))


def _prune() -> str:
    model = _model()
    full = mct_fx.resource_utilization(model, _loader()[0], "imx500")
    small, _ = mct_fx.prune(model, _loader(), mct_fx.ResourceUtilization(weights_memory=full.weights_memory * 0.8),
                            tpc="imx500")
    return _hash_model(small)


def _export(kind: str) -> str:
    qmodel = mct_fx.quantize(_model(), _loader(), "imx500", verbose=False)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        if kind == "qdq":
            mct_fx.export_onnx(qmodel, _probe()[:1], path)
        else:
            mct_fx.export_imx500(qmodel, _probe()[:1], path)
        import onnx

        m = onnx.load(str(path))
        m.producer_version = ""  # torch's version string
        return hashlib.sha256(m.SerializeToString()).hexdigest()[:16]


def _compare() -> str:
    model = _model()
    qmodel = mct_fx.quantize(model, _loader(), "imx500", verbose=False)
    table = mct_fx.compare(model, qmodel, _loader()[:2])
    return _hash_text(str(table))


def _troubleshoot() -> str:
    model = _model()
    qmodel = mct_fx.quantize(model, _loader(), "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, qmodel, _loader()[:2], verify=True, verbose=False)
    return _hash_text(json.dumps([repr(f) for f in report.findings]))


CASES: dict[str, Callable[[], str]] = {
    "ptq_default": _ptq(),
    "ptq_int8": _ptq(tpc="int8"),
    "ptq_hmse": _ptq(mct_fx.QuantConfig(weights_error_method=mct_fx.ErrorMethod.HMSE)),
    "ptq_moments_softmax_concat": _ptq(mct_fx.QuantConfig(weights_second_moment_correction=True, softmax_shift=True,
                                                          concat_threshold_update=True)),
    "ptq_no_corrections": _ptq(mct_fx.QuantConfig(weights_bias_correction=False, power_of_two_alignment=False,
                                                  shift_negative_correction=False)),
    "ptq_lut_w4": _derived_w4("imx500_lut"),
    "ptq_derived_w4": _derived_w4("imx500"),
    "mixed_precision": _mp,
    "mixed_precision_activations": _mp_activations,
    "tensorboard": _tb,
    "gptq": _gptq,
    "qat": _qat,
    "prune": _prune,
    "export_qdq": lambda: _export("qdq"),
    "export_imx500": lambda: _export("imx500"),
    "compare": _compare,
    "troubleshoot_verify": _troubleshoot,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--check", type=Path)
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    torch.set_num_threads(1)  # thread count changes float summation order
    got = {}
    for name in names:
        start = time.perf_counter()
        got[name] = CASES[name]()
        print(f"{name:28s} {got[name]}  ({time.perf_counter() - start:.1f} s)", flush=True)
    if args.save:
        args.save.write_text(json.dumps(got, indent=1))
        return 0
    want = json.loads(args.check.read_text())
    differ = [n for n in names if want.get(n) != got[n]]
    print("all equal" if not differ else f"differ: {', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
