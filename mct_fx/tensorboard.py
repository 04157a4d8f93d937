"""TensorBoard logging of the quantization pipeline (``QuantConfig(log_dir=...)``, ``--log-dir``).

What lands in ``log_dir`` (open it with ``tensorboard --logdir DIR``):

* Graphs: one run per stage, ``graph_1_traced``, ``graph_2_passes`` (after BN folding,
  collapsing, equalization), ``graph_3_quantized``; a graph TorchScript cannot
  trace is logged as its fx code under the text tag ``graph/<stage>`` instead.
* Histograms: ``calibration/<node>`` (each activation quantizer's calibration
  histogram), ``weights/<node>/threshold`` (per-channel kernel thresholds),
  ``ranges/<node>/channel_absmax`` (per-channel float activation maxima).
* Scalars: ``threshold/<node>`` (activation grid maximum), ``similarity/<metric>/<node>``
  and ``similarity/<metric>/output`` (float vs quantized on the first calibration
  batches), ``resource_utilization/<measure>`` and ``mixed_precision/bits/<node>``
  when a budget was searched, ``gptq/distance`` per epoch, ``datagen/bn_loss`` and
  ``datagen/output_loss`` per iteration.
* Text: ``thresholds`` and ``similarity`` tables, ``mixed_precision`` (the choice).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from torch import fx

from mct_fx.meta import Role, quantizer_nodes_by_role
from mct_fx.quantizers.modules import ActivationQuantizer, FakeQuantizer, WeightQuantizer

__all__ = ["TensorBoardLogger", "GRAPH_STAGES"]

log = logging.getLogger("mct_fx")
GRAPH_STAGES = ("1_traced", "2_passes", "3_quantized")


class TensorBoardLogger:
    """Writes the pipeline's artifacts under ``log_dir``; every method is a no-op when it is None."""

    def __init__(self, log_dir: str | os.PathLike | None):
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writer = None

    @property
    def enabled(self) -> bool:
        return self.log_dir is not None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ----------------------------------------------------------------- stages

    def graph(self, stage: str, gm: fx.GraphModule, inputs: tuple) -> None:
        """The graph at ``stage`` (one of ``GRAPH_STAGES``), as its own run so stages sit side by side."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(self.log_dir, f"graph_{stage}"))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # add_graph's TorchScript trace is deprecated
                writer.add_graph(gm, inputs, use_strict_trace=False)
        except Exception as e:  # noqa: BLE001 - TorchScript tracing is best effort; the code always lands
            log.info("tensorboard: graph %s not traceable by TorchScript (%s); logged as text", stage, e)
        finally:
            writer.close()
        self.writer.add_text(f"graph/{stage}", _code_block(gm.code))

    def calibration(self, gm: fx.GraphModule) -> None:
        """Each activation quantizer's calibration histogram (call before the grids are frozen)."""
        if not self.enabled:
            return
        tags = _tags(gm)
        for name, q in gm.named_modules():
            if not isinstance(q, ActivationQuantizer) or q.observer.empty:
                continue
            centres, counts = q.observer.centres_and_counts()
            if counts.numel() < 2:
                continue
            centres, counts = centres.double().cpu(), counts.double().cpu()
            width = float(centres[1] - centres[0])
            total = float(counts.sum())
            self.writer.add_histogram_raw(
                f"calibration/{tags.get(name, name)}", min=float(q.observer.min), max=float(q.observer.max), num=total,
                sum=float((centres * counts).sum()), sum_squares=float((centres.square() * counts).sum()),
                bucket_limits=(centres + width / 2).tolist(), bucket_counts=counts.tolist(), global_step=0)

    def thresholds(self, gm: fx.GraphModule) -> None:
        """The chosen grids: activation range per node, kernel thresholds per channel."""
        if not self.enabled:
            return
        rows = ["| quantizer | bits | method | grid |", "| --- | --- | --- | --- |"]
        tags = _tags(gm)
        for name, q in gm.named_modules():
            if not isinstance(q, FakeQuantizer) or not q.calibrated or not q.affine:
                continue
            lo, hi = q.grid_range()
            if isinstance(q, WeightQuantizer):
                self.writer.add_histogram(f"weights/{tags.get(name, name)}/threshold", hi.detach().float().cpu(), 0)
                grid = (f"per-channel max {float(hi.max()):.4g}" if hi.numel() > 1
                        else f"{float(lo):.4g}..{float(hi):.4g}")
            else:
                self.writer.add_scalar(f"threshold/{tags.get(name, name)}", float(hi.max()), 0)
                grid = f"{float(lo.min()):.4g}..{float(hi.max()):.4g}"
            rows.append(f"| {name} | {q.n_bits} | {q.method.value} | {grid} |")
        self.writer.add_text("thresholds", "\n".join(rows))

    def similarity(self, comparison: Any) -> None:
        """Per-layer float-vs-quantized metrics (a :class:`mct_fx.report.Comparison`)."""
        if not self.enabled:
            return
        for row in comparison.layers:
            for metric, value in row.metrics.items():
                self.writer.add_scalar(f"similarity/{metric}/{row.node}", _finite(value), 0)
            if row.stats.channel_absmax:
                self.writer.add_histogram(f"ranges/{row.node}/channel_absmax",
                                          torch.tensor(row.stats.channel_absmax), 0)
        for metric, value in comparison.output.items():
            self.writer.add_scalar(f"similarity/{metric}/output", _finite(value), 0)
        self.writer.add_text("similarity", _code_block(str(comparison)))

    def mixed_precision(self, result: Any) -> None:
        """The bit-width search's choice (a ``MixedPrecisionResult``): figure, scalars and text."""
        if not self.enabled or result is None:
            return
        for measure in ("weights_memory", "activation_memory", "total_memory", "bops"):
            value = getattr(result.utilization, measure, None)
            if value is not None:
                self.writer.add_scalar(f"resource_utilization/{measure}", float(value), 0)
        bits = {node: _bits(choice) for node, choice in result.bits.items()}
        for node, b in bits.items():
            self.writer.add_scalar(f"mixed_precision/bits/{node}", b, 0)
        self.writer.add_text("mixed_precision", _code_block(str(result) + "\n" + "\n".join(
            f"{node}: {choice}" for node, choice in result.bits.items())))
        figure = _bits_figure(result.bits)
        if figure is not None:
            self.writer.add_figure("mixed_precision/bit_widths", figure, 0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(tag, float(value), step)


def _tags(gm: fx.GraphModule) -> dict[str, str]:
    """Quantizer module name -> the tag it is logged under: the node it serves (``/bias`` for a bias)."""
    return {q.target: record.node + ("/bias" if record.role is Role.BIAS else "")
            for q, record in quantizer_nodes_by_role(gm)}


def _finite(v: float) -> float:
    return min(float(v), 1e6) if v == v else 0.0  # TensorBoard draws no infinities


def _bits(choice: str) -> float:
    """``"W4"`` / ``"A8"`` / ``"W4A8"`` -> the smallest bit-width named (what the layer was squeezed to)."""
    import re

    values = [int(v) for v in re.findall(r"\d+", choice)]
    return float(min(values)) if values else 0.0


def _bits_figure(bits: dict[str, str]):
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = plt.figure(figsize=(max(5.0, 0.25 * len(bits)), 3))
    ax = fig.add_subplot()
    ax.bar(range(len(bits)), [_bits(b) for b in bits.values()])
    ax.set_xticks(range(len(bits)), list(bits), rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_title("mixed precision: bit-width per configurable node")
    return fig


def _code_block(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")  # markdown preformatted
