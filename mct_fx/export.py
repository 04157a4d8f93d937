"""QDQ ONNX export: standard ``QuantizeLinear``/``DequantizeLinear``, runnable by plain onnxruntime.

Each frozen quantizer of the GraphModule becomes ONNX's own quantization ops:

* a weight quantizer on a constant weight: the weight stored as its integer
  codes (int8, or uint8 on request) followed by ``DequantizeLinear`` (with
  ``axis`` when per-channel), as quantization tools write weights;
* every other quantizer: ``QuantizeLinear`` → ``DequantizeLinear`` with a
  scale and an int8 zero point (int16 above 256 levels, which needs opset 21;
  unsigned grids are offset onto the signed type).  A grid narrower than its
  type (2..7 bits) is preceded by a ``Clip`` to the grid's real range, which
  gives the same codes as clamping them.

Anything else that fake-quantizes a constant (e.g. a look-up-table weight
quantizer) is exported as its dequantized values, with a warning.  The file is
checked with ``onnx.checker`` and, when onnxruntime is installed, run on the
example input and compared with the GraphModule.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, fx, nn

from mct_fx.export_check import (
    EDGEMDT_DOMAIN,
    Agreement,
    ExportError,
    agreement,
    edgemdt_session_options,
    float_outputs,
    graph_outputs,
    has_postprocess,
    output_step,
)
from mct_fx.export_check import run_onnxruntime as run_session
from mct_fx.graph_utils import attr_value
from mct_fx.kernels import dequantize, fake_quant
from mct_fx.kernels import quantize as quantize_codes
from mct_fx.quantizers.modules import FakeQuantizer, WeightQuantizer

__all__ = ["export_onnx", "ExportError", "ExportResult", "Agreement"]

log = logging.getLogger("mct_fx")

_MIN_OPSET, _TORCH_MAX_OPSET, _MAX_OPSET = 13, 20, 21  # per-axis QDQ since 13; int16 QDQ since 21


@dataclass(frozen=True)
class ExportResult:
    """What was written; ``agreement`` is None when onnxruntime is not installed or ``verify=False``."""

    path: Path
    opset: int
    n_quantize: int
    n_dequantize: int
    agreement: Agreement | None


@dataclass(frozen=True, eq=False)
class _Grid:
    """A frozen grid, passed to the autograd functions as one non-tensor argument so that
    their ``symbolic`` sees the values (ONNX constants), not graph inputs."""

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    axis: int | None
    dtype: torch.dtype  # ONNX integer type of the codes / zero point
    clip: tuple[Tensor, Tensor] | None = None  # real range, when narrower than ``dtype``

    def constants(self, g) -> tuple[object, object, dict[str, int]]:
        s = g.op("Constant", value_t=self.scale)
        z = g.op("Constant", value_t=self.zero_point.to(self.dtype))
        return s, z, ({} if self.axis is None else {"axis_i": self.axis})


class _QDQ(torch.autograd.Function):
    """Fake-quantize in PyTorch; ``[Clip →] QuantizeLinear → DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx, x: Tensor, grid: _Grid) -> Tensor:  # noqa: ARG004
        return fake_quant(x, grid.scale, grid.zero_point, grid.qmin, grid.qmax, grid.axis)

    @staticmethod
    def symbolic(g, x, grid: _Grid):
        s, z, kw = grid.constants(g)
        if grid.clip is not None:
            lo, hi = grid.clip
            x = g.op("Clip", x, g.op("Constant", value_t=lo), g.op("Constant", value_t=hi))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z, **kw), s, z, **kw)


class _Dequantize(torch.autograd.Function):
    """Dequantize stored integer codes; ``DequantizeLinear`` of an integer initializer in ONNX."""

    @staticmethod
    def forward(ctx, codes: Tensor, grid: _Grid) -> Tensor:  # noqa: ARG004
        return dequantize(codes.float(), grid.scale, grid.zero_point, grid.axis)

    @staticmethod
    def symbolic(g, codes, grid: _Grid):
        s, z, kw = grid.constants(g)
        return g.op("DequantizeLinear", codes, s, z, **kw)


def _grid(q: FakeQuantizer, where: str, codes: torch.dtype | None = None) -> _Grid:
    """``q``'s grid on int8 codes (int16 above 256 levels), or on ``codes`` for stored weights.

    A grid that does not fit the type's range moves by a constant offset (codes and
    zero point together, so its real values are unchanged), e.g. unsigned
    activations onto int8 with zero point -128, or int8 weights onto uint8 with 128.
    Stored codes are inside the grid already; a computed tensor on a grid
    narrower than its type (2..7 bits) gets a ``Clip`` to the grid's real range.
    """
    levels = q.qmax - q.qmin + 1
    if levels > 2**16:
        raise ExportError(f"{where}: integer range {q.qmin}..{q.qmax} fits no ONNX QDQ type")
    dtype = torch.int16 if levels > 2**8 else codes or torch.int8
    info = torch.iinfo(dtype)
    offset = 0 if info.min <= q.qmin and q.qmax <= info.max else info.min - q.qmin
    clip = None
    if codes is None and (q.qmin, q.qmax) != (info.min - offset, info.max - offset):
        if getattr(q, "axis", None) is not None:
            raise ExportError(f"{where}: a per-channel {q.n_bits}-bit grid on a non-constant tensor "
                              "has no QDQ form (use 8 or 16 bits)")
        clip = tuple(t.detach().float().reshape(()) for t in q.grid_range())
    return _Grid(q.scale.detach().float().clone(), q.zero_point.detach().float() + offset, q.qmin + offset,
                 q.qmax + offset, getattr(q, "axis", None), dtype, clip)


class _QDQModule(nn.Module):
    def __init__(self, q: FakeQuantizer, where: str):
        super().__init__()
        self.grid = _grid(q, where)

    def forward(self, x: Tensor) -> Tensor:
        return _QDQ.apply(x, self.grid)


class _DequantizeModule(nn.Module):
    def __init__(self, q: WeightQuantizer, weight: Tensor, where: str, code_dtype: torch.dtype):
        super().__init__()
        g = self.grid = _grid(q, where, code_dtype)
        self.register_buffer("codes", quantize_codes(weight.detach(), g.scale, g.zero_point, g.qmin, g.qmax,
                                                     g.axis).to(g.dtype))

    def forward(self) -> Tensor:
        return _Dequantize.apply(self.codes, self.grid)


class _Constant(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self) -> Tensor:
        return self.value


def _onnx_ready(qmodel: fx.GraphModule, weight_codes: torch.dtype) -> tuple[fx.GraphModule, bool, dict[str, float]]:
    """A copy of ``qmodel`` whose quantizers export as QDQ; whether it needs 16-bit types; the step
    of each quantizer that is exported as QuantizeLinear (by node name)."""
    gm = copy.deepcopy(qmodel)
    steps: dict[str, float] = {}
    for node in list(gm.graph.nodes):
        q = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(q, FakeQuantizer):
            continue
        where = f"quantizer {node.target!r}"
        if q.mode == "observe":
            raise ExportError(f"{where} is not calibrated: export a model returned by mct_fx.quantize")
        weight = attr_value(gm, node.args[0])
        if q.mode == "off":
            replacement = None
        elif not q.affine:
            if weight is None:
                raise ExportError(f"{where} ({type(q).__name__}) on a non-constant tensor has no QDQ form")
            warnings.warn(f"{where} ({type(q).__name__}) has no QDQ form: its weight is exported as its "
                          "dequantized float values", stacklevel=3)
            with torch.no_grad():
                replacement = _Constant(q(weight))
        elif isinstance(q, WeightQuantizer) and weight is not None:
            replacement = _DequantizeModule(q, weight, where, weight_codes)
        else:
            replacement = _QDQModule(q, where)
            steps[node.name] = float(q.scale.max())
        _swap(gm, node, replacement)
    needs_16 = any(m.grid.dtype == torch.int16 for m in gm.modules() if isinstance(m, _QDQModule | _DequantizeModule))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, needs_16, steps


def _swap(gm: fx.GraphModule, node: fx.Node, replacement: nn.Module | None) -> None:
    """Replace the quantizer call ``node`` by ``replacement`` (None: by its input)."""
    if replacement is None:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    gm.add_submodule(node.target, replacement)
    if not isinstance(replacement, _QDQModule):
        node.args = ()  # reads its own constant


def export_onnx(qmodel: fx.GraphModule, example_input: Tensor | tuple[Tensor, ...], path: str | os.PathLike,
                opset: int | None = None, dynamic_batch: bool = True, *, weights_dtype: str = "int8",
                verify: bool = True) -> ExportResult:
    """Write ``qmodel`` (from :func:`mct_fx.quantize`) as a QDQ ONNX file and check it.

    ``opset`` defaults to 20, or 21 when a grid needs 16-bit codes; the lowest
    allowed is 13 (per-axis QDQ).  ``dynamic_batch`` makes dimension 0 of every
    input and output symbolic.  ``weights_dtype``: ``"int8"`` stores weights as
    signed codes (zero point 0 for symmetric grids, what most runtimes and
    compilers expect); ``"uint8"`` offsets them by 128, which keeps onnxruntime's
    fused int8 kernels exact on x86 CPUs without VNNI (signed weights can saturate
    there, costing accuracy) at some speed.  The file is checked with ``onnx.checker``; with
    onnxruntime installed (and ``verify``) it is run on ``example_input`` and
    compared with ``qmodel`` (see :class:`Agreement`); a file less accurate than
    ``qmodel`` raises :class:`ExportError` (and is kept for inspection).
    """
    import onnx

    if not isinstance(qmodel, fx.GraphModule):
        raise ExportError(f"export_onnx takes the GraphModule mct_fx.quantize returns, got {type(qmodel).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    codes = {"int8": torch.int8, "uint8": torch.uint8}.get(weights_dtype)
    if codes is None:
        raise ExportError(f"weights_dtype must be 'int8' or 'uint8', got {weights_dtype!r}")
    gm, needs_16, steps = _onnx_ready(qmodel, codes)
    post = has_postprocess(qmodel)  # Sony's NMS / box decoding: EdgeMDT ops, whose kernels the check needs
    if opset is None:
        opset = _MAX_OPSET if needs_16 else _TORCH_MAX_OPSET
    if not _MIN_OPSET <= opset <= _MAX_OPSET:
        raise ExportError(f"opset must be in {_MIN_OPSET}..{_MAX_OPSET}, got {opset}")
    if needs_16 and opset < 21:
        raise ExportError(f"the model has 16-bit grids, which QuantizeLinear supports from opset 21 (asked {opset})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gm.eval()
    expected = graph_outputs(qmodel, inputs)
    names_in = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    names_out = [f"output{i}" if len(expected) > 1 else "output" for i in range(len(expected))]
    axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(gm, inputs, str(path), dynamo=False, opset_version=min(opset, _TORCH_MAX_OPSET),
                          input_names=names_in, output_names=names_out, dynamic_axes=axes,
                          do_constant_folding=True, custom_opsets={EDGEMDT_DOMAIN: 1} if post else None)
    model = onnx.load(str(path))
    if opset > _TORCH_MAX_OPSET:  # ops changed at 21 only gained types: the opset-20 graph means the same
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in model.graph.node]
    agreed = None
    if verify:
        got = _run_onnxruntime(path, inputs, post)
        if got is not None:
            agreed = agreement(got, expected, float_outputs(qmodel, inputs), output_step(qmodel, steps))
    result = ExportResult(path, opset, ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), agreed)
    if agreed is not None and not agreed.faithful:
        raise ExportError(f"{path}: onnxruntime's output is less accurate than the GraphModule's "
                          f"({agreed.sqnr_onnx_db:.1f} dB vs {agreed.sqnr_graph_module_db:.1f} dB SQNR against "
                          "float); the file is kept for inspection")
    log.info("wrote %s (opset %d, %d QuantizeLinear, %d DequantizeLinear)%s", path, opset, result.n_quantize,
             result.n_dequantize, "" if agreed is None else f"; vs the GraphModule: {agreed}")
    return result


def _run_onnxruntime(path: Path, inputs: tuple[Tensor, ...], post: bool) -> list[Tensor] | None:
    """The file's outputs under onnxruntime with graph optimizations off, i.e. the ONNX
    semantics of QDQ (fused int8 kernels may differ by hardware); None without onnxruntime, or,
    for a file with ``EdgeMDT`` ops (``post``), without their kernels."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime not installed: %s not run", path)
        return None
    if post:
        options = edgemdt_session_options()
        if options is None:
            log.warning("%s holds Sony's EdgeMDT ops (NMS / box decoding); it is not run: their kernels need "
                        "pip install 'mct-fx[imx500]' (edge-mdt-cl, onnxruntime-extensions)", path)
            return None
    else:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return run_session(path, inputs, options)
