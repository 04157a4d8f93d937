"""Try the troubleshooter's knobs: quantize again with each suggested configuration change and
measure the model output against the float model, so a suggestion comes with its measured effect.

A knob is a hypothesis from one layer's statistics; the network may disagree (on MobileNetV2 a
wider grid that stops clipping one layer's tail costs resolution everywhere else and lowers the
output SQNR).  Verification re-runs post-training quantization with the model's recorded
``QuantConfig`` (and mixed-precision budget) plus the change, on the troubleshooter's data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from torch import fx, nn

from mct_fx.config import CONFIG_KEY, LayerOverride, QuantConfig
from mct_fx.meta import PREPARATION, SUMMARY
from mct_fx.ptq import quantize
from mct_fx.report import output_sqnr
from mct_fx.troubleshoot_types import Finding

__all__ = ["apply_change", "verify_findings"]

log = logging.getLogger("mct_fx")


def apply_change(base: QuantConfig, change: dict) -> QuantConfig:
    """``base`` with a finding's change: field values, and ``"override"`` as one more LayerOverride."""
    config = replace(base, **{k: v for k, v in change.items() if k != "override"})
    if "override" in change:
        config = replace(config, overrides=(*config.overrides, LayerOverride(**change["override"])))
    return config


def _key(change: dict) -> str:
    return repr(sorted((k, sorted(v.items()) if isinstance(v, dict) else v) for k, v in change.items()))


def verify_findings(findings: Iterable[Finding], float_model: nn.Module, qmodel: fx.GraphModule, loader: Iterable,
                    *, n_batches: int | None, limit: int) -> tuple[tuple[Finding, ...], float | None]:
    """The findings with ``measured`` filled in for the first ``limit`` distinct changes, and the baseline:
    the output SQNR of the unchanged configuration quantized the same way (on ``loader``, which may hold
    other or fewer samples than the model was calibrated on)."""
    findings = tuple(findings)
    base, preparation = qmodel.meta.get(CONFIG_KEY), qmodel.meta.get(PREPARATION)
    if base is None or preparation is None:
        log.warning("troubleshoot: the model records no QuantConfig / target; the knobs are not verified")
        return findings, None
    if not any(f.change is not None for f in findings):
        return findings, None
    summary = qmodel.meta.get(SUMMARY)
    budget = summary.mixed_precision.target if summary is not None and summary.mixed_precision else None
    def measure(config: QuantConfig) -> float:
        candidate = quantize(float_model, loader, preparation.tpc, config, target=budget, n_batches=n_batches,
                             verbose=False, leaf_modules=preparation.leaf_modules,
                             concrete_args=preparation.concrete_args)
        return output_sqnr(float_model, candidate, loader, n_batches)

    baseline = measure(base)
    measured: dict[str, float | None] = {}
    for f in findings:
        if f.change is None or _key(f.change) in measured or len(measured) >= limit:
            continue
        try:
            measured[_key(f.change)] = measure(apply_change(base, f.change))
        except ValueError as e:  # e.g. the target offers no such bit-width for that node
            log.info("troubleshoot: knob %s not applicable: %s", f.knob, e)
            measured[_key(f.change)] = None
    return tuple(replace(f, measured=measured.get(_key(f.change))) if f.change is not None else f
                 for f in findings), baseline
