"""What the ONNX exporters share: their error type and the check that a file means what the GraphModule means.

Both exporters (QDQ in :mod:`mct_fx.export`, IMX500 in :mod:`mct_fx.export_imx500`)
run the written file on the example input and compare it with the GraphModule
by one rule (:class:`Agreement`); the onnxruntime session each needs differs
only in its options (the IMX500 file needs the custom-op library).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, fx

from mct_fx.measure import energy_ratio_db
from mct_fx.quantizers.modules import quantizers_off

__all__ = ["ExportError", "Agreement", "agreement", "float_outputs", "graph_outputs", "output_step",
           "run_onnxruntime", "EDGEMDT_DOMAIN", "has_postprocess", "define_edgemdt_kernels", "edgemdt_session_options"]

EDGEMDT_DOMAIN = "EdgeMDT"  # Sony's detection post-processing (edgemdt_cl), opset 1
_EDGEMDT_KERNELS = ("edgemdt_cl.pytorch.nms.nms_ort", "edgemdt_cl.pytorch.nms_obb.nms_obb_ort",
                    "edgemdt_cl.pytorch.box_decode.box_decode_ort")


class ExportError(RuntimeError):
    """The model cannot be exported as asked (names the quantizer, node or setting at fault)."""


@dataclass(frozen=True)
class Agreement:
    """How onnxruntime's run of the file compares with the GraphModule on the example input.

    Different float summation orders flip a few values that sit on a rounding
    boundary (about 1 in 10^5 at the first layer); each flip moves later layers
    by a step or more, so deep models rarely agree within one step everywhere.
    ``sqnr_*`` measure both against the float model (quantizers off): a file
    that means the same as the GraphModule is as accurate as it.
    """

    max_abs_diff: float
    output_step: float | None  # step of the quantizer producing the output(s); None when not quantized
    within_one_step: float  # fraction of output elements within one step (of 1e-6 when not quantized)
    sqnr_graph_module_db: float
    sqnr_onnx_db: float

    @property
    def faithful(self) -> bool:
        """The file is as accurate as the GraphModule (within 1 dB), or agrees within one step everywhere."""
        return self.within_one_step == 1.0 or self.sqnr_onnx_db >= self.sqnr_graph_module_db - 1.0


def graph_outputs(gm: fx.GraphModule, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The GraphModule's outputs on ``inputs``, flattened, as float32."""
    with torch.no_grad():
        return [t.float() for t in torch.utils._pytree.tree_leaves(gm(*inputs))]


def float_outputs(qmodel: fx.GraphModule, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The outputs with every quantizer off (the float model, BN folded); the modes are restored."""
    with quantizers_off(qmodel):
        return graph_outputs(qmodel, inputs)


def output_step(gm: fx.GraphModule, steps: dict[str, float]) -> float | None:
    """The largest step of the quantizers producing the graph's outputs (None if an output is float).

    ``steps``: the step of each activation quantizer, by node name.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found = [steps.get(n.name) if isinstance(n, fx.Node) else None for n in torch.utils._pytree.tree_leaves(out.args)]
    return None if not found or None in found else max(found)


def _sqnr_db(ref: list[Tensor], got: list[Tensor]) -> float:
    signal = sum(float(r.pow(2).sum()) for r in ref)
    noise = sum(float((r - g).pow(2).sum()) for r, g in zip(ref, got, strict=True))
    return energy_ratio_db(signal, noise)


def agreement(got: list[Tensor], expected: list[Tensor], floats: list[Tensor], step: float | None) -> Agreement:
    """The file's outputs ``got`` against the GraphModule's ``expected``, both against the float ``floats``."""
    if len(got) != len(expected):
        raise ExportError(f"the file has {len(got)} outputs, the GraphModule {len(expected)}")
    diffs = torch.cat([(g - e).abs().flatten() for g, e in zip(got, expected, strict=True)])
    tol = (step if step is not None else 1e-6) * (1 + 1e-6)
    return Agreement(max_abs_diff=float(diffs.max()), output_step=step,
                     within_one_step=float((diffs <= tol).float().mean()),
                     sqnr_graph_module_db=_sqnr_db(floats, expected), sqnr_onnx_db=_sqnr_db(floats, got))


def has_postprocess(gm: fx.GraphModule) -> bool:
    """``gm`` calls Sony's detection post-processing (NMS, box decoding): its file has ``EdgeMDT`` ops."""
    from mct_fx.tpc.matching import annotation
    from mct_fx.tpc.vocabulary import POSTPROCESS_OPS

    return any((a := annotation(n)) is not None and a.op in POSTPROCESS_OPS for n in gm.graph.nodes)


def define_edgemdt_kernels() -> bool:
    """Define the reference kernels of the ``EdgeMDT`` ops (edge-mdt-cl's, run by onnxruntime-extensions);
    False when either is not installed.  Call it before the extensions library is registered on a session."""
    import importlib

    try:
        import onnxruntime_extensions  # noqa: F401

        for module in _EDGEMDT_KERNELS:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def edgemdt_session_options():
    """onnxruntime session options with the ``EdgeMDT`` reference kernels, graph optimizations off; None when
    edge-mdt-cl or onnxruntime-extensions is not installed."""
    if not define_edgemdt_kernels():
        return None
    import onnxruntime as ort
    import onnxruntime_extensions

    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def run_onnxruntime(path: Path, inputs: tuple[Tensor, ...], options) -> list[Tensor]:
    """The file's outputs under onnxruntime on the CPU with ``options`` (an ``ort.SessionOptions``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(o).float() for o in session.run(None, feed)]
