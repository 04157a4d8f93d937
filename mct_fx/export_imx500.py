"""IMX500 export: Sony's MCTQ ONNX, the format ``imxconv-pt`` converts for the chip.

Quantization is carried by custom ops of domain ``mct_quantizers`` (opset 1),
with the exact attribute sets the converter checks:

* a power-of-two activation grid → ``ActivationPOTQuantizer`` (threshold,
  signed, bits);
* a symmetric / power-of-two kernel grid → ``WeightsSymmetricQuantizer`` /
  ``WeightsPOTQuantizer`` on the float weight, thresholds (one per channel) as
  an input: the converter folds the weights itself;
* a look-up-table kernel → ``WeightsLUTSymmetricQuantizer`` / ``WeightsLUTPOTQuantizer``
  (one table of 8-bit values per tensor, a threshold per channel).

What the format has no word for is rewritten with the same function: a
shift-negative grid (an unsigned grid with a zero point) becomes ``x + shift``
before an unsigned ``ActivationPOTQuantizer``, and the ``- shift`` moves into
the biases of the layers reading it (``b - W_q·shift``; their zero padding
becomes padding with the shift).  Power-of-two alignment is already folded into
weights and biases.  What cannot be expressed (uniform grids, look-up-table
activations, a tensor left unquantized, 16-bit activations into a convolution,
a batch other than 1) raises :class:`ExportError` before anything is written.

The file is checked with ``onnx.checker`` and, with the optional extra
``mct-fx[imx500]`` (``mct-quantizers`` + ``onnxruntime-extensions``, the
reference kernels of these ops), run in onnxruntime and compared with the
GraphModule by the QDQ exporter's rule (:class:`~mct_fx.export_check.Agreement`).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mct_fx.export_check import (
    EDGEMDT_DOMAIN,
    Agreement,
    ExportError,
    agreement,
    define_edgemdt_kernels,
    float_outputs,
    graph_outputs,
    output_step,
)
from mct_fx.export_check import run_onnxruntime as run_session
from mct_fx.graph_utils import LAYERS, attr_value, tensor_shape
from mct_fx.passes.explicit_shift import explicit_shift
from mct_fx.passes.lower_rank import MAX_RANK, lower_rank
from mct_fx.passes.order_fc_readers import order_fc_readers
from mct_fx.quantizers.clamp import BoundedReLU
from mct_fx.quantizers.lut import LutWeightQuantizer
from mct_fx.quantizers.modules import ActivationQuantizer, FakeQuantizer, WeightQuantizer
from mct_fx.quantizers.params import LUT_VALUE_BITS, QuantMethod
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.vocabulary import POSTPROCESS_OPS

__all__ = ["export_imx500", "Imx500ExportResult", "MCTQ_DOMAIN", "reference_session_options"]

log = logging.getLogger("mct_fx")

MCTQ_DOMAIN = "mct_quantizers"
MCTQ_VERSION = "1.6.0"  # the mct-quantizers release imx500-converter 3.19 is built with
OPSET = 20  # the converter takes opsets 15..20
_MAX_IR_VERSION = 10  # the converter checks the file with onnx 1.17
_LUT_EPS = 1e-8  # the LUT ops divide by (threshold + eps)
# ops that move or select values without computing new ones: their output keeps the input's grid
_PRESERVING = ("Dropout", "Identity", "Flatten", "Reshape", "Permute", "Transpose", "Squeeze", "Unsqueeze",
               "Expand", "GetItem", "SplitChunk", "Unstack", "MaxPool", "Pad", "ZeroPadding2D", "Cast")


@dataclass(frozen=True)
class Imx500ExportResult:
    """What was written: the ops of domain ``mct_quantizers`` by type, and the agreement with the
    GraphModule (None when ``verify=False`` or the reference kernels are not installed)."""

    path: Path
    opset: int
    quantizers: dict[str, int]
    shifted: tuple[str, ...]  # activation quantizers whose shift-negative grid became add + bias correction
    agreement: Agreement | None


@dataclass(frozen=True, eq=False)
class _Op:
    """One ``mct_quantizers`` op: its type, attributes (ONNX-suffixed names), constant inputs after the
    tensor, and what it computes (the GraphModule's own quantizer, so the export traces the same values)."""

    op_type: str
    attrs: dict[str, object]
    constants: tuple[Tensor, ...]
    compute: Callable[[Tensor], Tensor] = field(repr=False)
    shape: list[int] = field(default_factory=list)  # of the traced input: the output's static shape in ONNX


class _Mctq(torch.autograd.Function):
    """The quantizer in PyTorch; one ``mct_quantizers::<op_type>`` node in ONNX."""

    @staticmethod
    def forward(ctx, x: Tensor, op: _Op) -> Tensor:  # noqa: ARG004
        op.shape[:] = x.shape
        return op.compute(x)

    @staticmethod
    def symbolic(g, x, op: _Op):
        constants = [g.op("Constant", value_t=c) for c in op.constants]
        out = g.op(f"{MCTQ_DOMAIN}::{op.op_type}", x, *constants, **op.attrs)
        return out.setType(x.type().with_sizes(op.shape))


class _MctqModule(nn.Module):
    """Holds no state of its own (``op`` is a plain attribute), so the exporter's tracer sees none."""

    def __init__(self, op: _Op):
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return _Mctq.apply(x, self.op)


class _Clip(nn.Module):
    """``BoundedReLU`` as one ``Clip(0, bound)`` (it exports as Relu + Min, which the converter does not fuse)."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = bound

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, 0.0, self.bound)


def _version_attr() -> dict[str, object]:
    return {"mctq_version_s": MCTQ_VERSION}


def _activation_op(q: ActivationQuantizer, where: str) -> _Op:
    """``ActivationPOTQuantizer`` for a frozen power-of-two grid without zero point."""
    if not q.affine:
        raise ExportError(f"{where}: look-up-table activations have no IMX500 op (quantize for 'imx500')")
    if q.method is not QuantMethod.POWER_OF_TWO:
        raise ExportError(f"{where}: a {q.method.value} activation grid has no IMX500 op (it takes power-of-two "
                          "grids only: quantize for the 'imx500' target)")
    if float(q.zero_point) != 0:
        raise ExportError(f"{where}: a grid with zero point {float(q.zero_point):g} has no IMX500 op")
    signed = q.qmin < 0
    threshold = float(q.scale) * 2 ** (q.n_bits - 1 if signed else q.n_bits)
    return _Op("ActivationPOTQuantizer", {"threshold_f": threshold, "signed_i": int(signed), "num_bits_i": q.n_bits,
                                          **_version_attr()}, (), q.forward)


def _weight_op(q: WeightQuantizer, weight: Tensor, where: str) -> _Op:
    """The weights op for a frozen symmetric / power-of-two / look-up-table kernel grid."""
    per_channel = q.axis is not None
    common = {"num_bits_i": q.n_bits, "per_channel_i": int(per_channel), "channel_axis_i": q.axis or 0,
              "signed_i": 1}
    if isinstance(q, LutWeightQuantizer):
        name = {QuantMethod.LUT_POT: "WeightsLUTPOTQuantizer",
                QuantMethod.LUT_SYMMETRIC: "WeightsLUTSymmetricQuantizer"}[q.method]
        values = torch.round(q.centers.detach().float() * 2 ** (LUT_VALUE_BITS - 1))
        attrs = {**common, "input_rank_i": weight.dim(), "lut_values_bitwidth_i": LUT_VALUE_BITS,
                 "eps_f": _LUT_EPS, **_version_attr()}
        return _Op(name, attrs, (values, q.scale.detach().float().reshape(-1).clone()), q.forward)
    if q.method not in (QuantMethod.SYMMETRIC, QuantMethod.POWER_OF_TWO):
        raise ExportError(f"{where}: a {q.method.value} kernel grid has no IMX500 op (it takes symmetric, "
                          "power-of-two or look-up-table kernels)")
    if bool((q.zero_point != 0).any()):
        raise ExportError(f"{where}: a kernel grid with a zero point has no IMX500 op")
    name = "WeightsPOTQuantizer" if q.method is QuantMethod.POWER_OF_TWO else "WeightsSymmetricQuantizer"
    threshold = (q.scale.detach().float() * 2 ** (q.n_bits - 1)).reshape(-1).clone()
    return _Op(name, {**common, **_version_attr()}, (threshold,), q.forward)


# ------------------------------------------------------------------ graph checks


def _quantizer(gm: fx.GraphModule, node: fx.Node, cls: type = FakeQuantizer) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, cls) else None


def _op_of(node: fx.Node) -> str:
    ann = annotation(node)
    return (ann.op if ann is not None else None) or "unknown op"


def _preserving(node: fx.Node) -> bool:
    ann = annotation(node)
    return (ann is not None and ann.op in _PRESERVING and ann.config is not None
            and not ann.config.enable_activation_quantization)


def _check_activations(gm: fx.GraphModule) -> None:
    """Every float tensor the graph computes is quantized: by its own quantizer, as the inner node of a
    fused group, or as an op that only moves quantized values.  16-bit activations feed no convolution."""
    quantized: set[fx.Node] = set()
    post: set[fx.Node] = set()  # detection post-processing and what only reads its results: float on the chip
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        ann = annotation(node)
        inputs = [i for i in node.all_input_nodes if i.op != "get_attr"]
        if (ann is not None and ann.op in POSTPROCESS_OPS) or (inputs and all(i in post for i in inputs)):
            post.add(node)
            continue
        q = _quantizer(gm, node)
        if q is not None:
            if isinstance(q, ActivationQuantizer):
                quantized.add(node)
                _check_bits_into_conv(gm, node, q)
            continue
        if node.op != "placeholder" and (ann is None or not ann.float_output):
            continue  # integer / boolean outputs (indices, shapes), nodes the passes added
        users = list(node.users)
        if users and all(isinstance(_quantizer(gm, u), ActivationQuantizer) for u in users):
            continue
        if ann is not None and ann.fused_into is not None:
            continue
        if _preserving(node) and all(i in quantized for i in _tensor_inputs(node)):
            quantized.add(node)
            continue
        what = "the input" if node.op == "placeholder" else f"node {node.name!r} ({_op_of(node)})"
        raise ExportError(f"{what}: its output is not quantized, and the IMX500 quantizes every activation "
                          "tensor (an op the target does not know stays float: replace it, or describe it in the "
                          "TPC)")


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The float activations ``node`` reads (not constants, sizes or indices)."""
    def is_tensor(a: fx.Node) -> bool:
        ann = annotation(a)
        return a.op in ("placeholder", "call_module") if ann is None else ann.float_output

    return [a for a in node.all_input_nodes if a.op != "get_attr" and is_tensor(a)]


def _check_bits_into_conv(gm: fx.GraphModule, qnode: fx.Node, q: ActivationQuantizer) -> None:
    if q.n_bits <= 8:
        return
    stack = list(qnode.users)
    while stack:
        user = stack.pop()
        if user.op == "call_function" and user.target in LAYERS and user.target is not F.linear:
            raise ExportError(f"quantizer {qnode.target!r}: a {q.n_bits}-bit activation feeds convolution "
                              f"{user.name!r}; the IMX500 converter takes 8-bit convolution inputs only")
        if _preserving(user):
            stack.extend(user.users)


def _check_rank(gm: fx.GraphModule) -> None:
    """Every tensor at most 4-D (``tensor_meta`` from :func:`lower_rank`): the converter refuses others."""
    for node in gm.graph.nodes:
        shape = tensor_shape(node) or ()
        if len(shape) > MAX_RANK:
            raise ExportError(f"node {node.name!r} makes a {len(shape)}-D tensor {list(shape)}; the IMX500 "
                              f"converter takes at most {MAX_RANK}-D tensors (a view -> permute -> reshape chain "
                              "is rewritten when its merged form fits; reshape this one in the model)")


def _imx500_ready(qmodel: fx.GraphModule,
                  inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, dict[str, float], list[str]]:
    """A copy of ``qmodel`` whose quantizers export as ``mct_quantizers`` ops and whose tensors are at
    most 4-D; the output step of each activation quantizer (by node name); the activation quantizers
    that were shifted."""
    gm = copy.deepcopy(qmodel)
    lower_rank(gm, inputs)
    _check_rank(gm)
    order_fc_readers(gm)
    for node, q in [(n, _quantizer(gm, n)) for n in gm.graph.nodes]:
        if q is None:
            continue
        where = f"quantizer {node.target!r}"
        if q.mode == "observe":
            raise ExportError(f"{where} is not calibrated: export a model returned by mct_fx.quantize")
        if q.mode == "off":
            raise ExportError(f"{where} is off: the IMX500 quantizes every activation and kernel")
    _check_activations(gm)
    ops: dict[fx.Node, _Op] = {}
    steps: dict[str, float] = {}
    try:
        shifted = explicit_shift(gm)
    except ValueError as e:
        raise ExportError(str(e)) from None
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BoundedReLU):
            gm.add_submodule(node.target, _Clip(gm.get_submodule(node.target).max_val))
        q = _quantizer(gm, node)
        where = f"quantizer {node.target!r}"
        if isinstance(q, ActivationQuantizer):
            ops[node] = _activation_op(q, where)
            steps[node.name] = float(q.scale)
        elif isinstance(q, WeightQuantizer):
            weight = attr_value(gm, node.args[0])
            if weight is None:
                raise ExportError(f"{where} quantizes a computed tensor; the IMX500 quantizes constant kernels")
            ops[node] = _weight_op(q, weight, where)
        elif q is not None:
            raise ExportError(f"{where} ({type(q).__name__}) has no IMX500 op")
    for node, op in ops.items():
        gm.add_submodule(node.target, _MctqModule(op))
    gm.graph.lint()
    gm.recompile()
    return gm, steps, shifted


# ------------------------------------------------------------------ the file


def _finish(model, source: str) -> None:
    """What the converter checks beyond ``torch.onnx.export``'s output: node names, a ``value_info``
    for every custom op's output, the ``mct_quantizers`` opset, IR version <= 10."""
    import onnx

    model.ir_version = min(model.ir_version, _MAX_IR_VERSION)
    if not any(i.domain == MCTQ_DOMAIN for i in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MCTQ_DOMAIN, 1))
    taken = {n.name for n in model.graph.node if n.name}
    counts: collections.Counter[str] = collections.Counter()
    for n in model.graph.node:
        while not n.name or (n.name in taken and counts[n.name] > 0):
            n.name = f"/{n.op_type}_{counts[n.op_type]}"
            counts[n.op_type] += 1
        counts[n.name] += 1
        taken.add(n.name)
    typed = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    for n in model.graph.node:
        if n.domain != MCTQ_DOMAIN:
            continue
        for out in n.output:
            if out in typed:
                continue
            source_type = typed.get(n.input[0])
            if source_type is None:
                raise ExportError(f"{source}: no shape for {n.name!r}'s input {n.input[0]!r}")
            info = onnx.ValueInfoProto()
            info.CopyFrom(source_type)
            info.name = out
            model.graph.value_info.append(info)
            typed[out] = info


def reference_session_options():
    """onnxruntime session options with the ``mct_quantizers`` reference kernels; None when not installed."""
    try:
        import mct_quantizers
        import onnxruntime as ort  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        return None
    import onnxruntime as ort

    if "edgemdt_cl.pytorch" in sys.modules:  # a model with Sony's NMS / box decoding: their kernels too
        define_edgemdt_kernels()  # before mct_quantizers registers the library
    options = mct_quantizers.get_ort_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def export_imx500(qmodel: fx.GraphModule, example_input: Tensor | tuple[Tensor, ...], path: str | os.PathLike, *,
                  verify: bool = True) -> Imx500ExportResult:
    """Write ``qmodel`` (from :func:`mct_fx.quantize` for an IMX500 target) as MCTQ ONNX for ``imxconv-pt``.

    ``example_input``: one sample with its batch dimension (batch 1: the chip takes one image).
    The file is checked with ``onnx.checker``; with ``mct-quantizers`` and
    ``onnxruntime-extensions`` installed (and ``verify``) it is run on ``example_input``
    and compared with ``qmodel``; a file less accurate than ``qmodel`` raises
    :class:`ExportError` (and is kept for inspection).  Nothing is written when the
    model has something the format cannot express.
    """
    import onnx

    if not isinstance(qmodel, fx.GraphModule):
        raise ExportError(f"export_imx500 takes the GraphModule mct_fx.quantize returns, got {type(qmodel).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ExportError(f"example input {i}: the IMX500 takes a static batch of 1, got shape {shape} "
                              "(pass x[:1])")
    gm, steps, shifted = _imx500_ready(qmodel, inputs)
    gm.eval()
    expected = graph_outputs(qmodel, inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names_in = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    names_out = [f"output{i}" if len(expected) > 1 else "output" for i in range(len(expected))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(gm, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=names_in,
                          output_names=names_out, do_constant_folding=True,
                          custom_opsets={MCTQ_DOMAIN: 1, EDGEMDT_DOMAIN: 1})
    model = onnx.load(str(path))
    _finish(model, str(path))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    counts = collections.Counter(n.op_type for n in model.graph.node if n.domain == MCTQ_DOMAIN)
    agreed = None
    options = reference_session_options() if verify else None
    if options is not None:
        got = run_session(path, inputs, options)
        agreed = agreement(got, expected, float_outputs(qmodel, inputs), output_step(qmodel, steps))
    elif verify:
        log.info("mct-quantizers / onnxruntime-extensions not installed (pip install 'mct-fx[imx500]'): "
                 "%s not run", path)
    result = Imx500ExportResult(path, OPSET, dict(sorted(counts.items())), tuple(shifted), agreed)
    if agreed is not None and not agreed.faithful:
        raise ExportError(f"{path}: onnxruntime's output is less accurate than the GraphModule's "
                          f"({agreed.sqnr_onnx_db:.1f} dB vs {agreed.sqnr_graph_module_db:.1f} dB SQNR against "
                          "float); the file is kept for inspection")
    log.info("wrote %s (%s)%s", path, ", ".join(f"{v} {k}" for k, v in counts.items()),
             "" if agreed is None else f"; vs the GraphModule: {agreed}")
    return result
