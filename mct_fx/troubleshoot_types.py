"""The troubleshooter's data types: its thresholds, what it finds, and the report it returns.

Apart from :mod:`mct_fx.troubleshoot` so that the HTML renderer and the
verifier can import them without importing the troubleshooter.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from mct_fx.measure import format_value, jsonable
from mct_fx.report import Comparison
from mct_fx.report_html import render_html

__all__ = ["TroubleshootConfig", "TroubleshootReport", "Finding", "CAUSES", "INHERIT_DB"]

CAUSES = ("low bit-width", "clipping", "outlier channel", "outliers", "negative tail", "unbalanced concat",
          "unknown op", "inherited", "unexplained")
INHERIT_DB = 3.0  # a flagged layer within this many dB of a flagged input carries that input's loss


@dataclass(frozen=True)
class TroubleshootConfig:
    """Thresholds of the troubleshooter.

    A layer is flagged when its SQNR is below ``sqnr_db``, its cosine below
    ``cosine``, or its SQNR is ``drop_db`` below the worst of its inputs' while
    under ``sqnr_db + drop_db``.
    Causes: activations reaching ``outlier_z`` standard deviations from the mean;
    a channel ``channel_ratio`` times wider than the median channel; a negative
    tail at most ``negative_tail_ratio`` of the positive range on a signed grid;
    concatenated inputs whose ranges differ ``concat_ratio`` times; weights or
    activations of at most ``low_bits`` bits; an activation grid whose clipping
    alone leaves an SQNR below ``clip_sqnr_db``.
    """

    sqnr_db: float = 20.0
    cosine: float = 0.99
    drop_db: float = 10.0
    outlier_z: float = 12.0
    channel_ratio: float = 8.0
    negative_tail_ratio: float = 0.25
    concat_ratio: float = 4.0
    low_bits: int = 4
    clip_sqnr_db: float = 30.0
    max_verify: int = 6  # distinct knobs ``verify=True`` tries (one quantization each)

    def __post_init__(self):
        for name in ("drop_db", "outlier_z", "channel_ratio", "concat_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TroubleshootConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.negative_tail_ratio < 1:
            raise ValueError(f"TroubleshootConfig.negative_tail_ratio must be in (0, 1), "
                             f"got {self.negative_tail_ratio}")
        if not -1 <= self.cosine <= 1:
            raise ValueError(f"TroubleshootConfig.cosine must be in [-1, 1], got {self.cosine}")
        if not 2 <= self.low_bits <= 16:
            raise ValueError(f"TroubleshootConfig.low_bits must be in 2..16, got {self.low_bits}")


@dataclass(frozen=True)
class Finding:
    node: str  # where the cause is: the flagged layer or one of the layers it reads
    cause: str  # one of CAUSES
    evidence: str
    knob: str
    seen_at: str = ""  # the flagged layer whose loss it explains (when not ``node`` itself)
    # the knob as a QuantConfig change ({field: value}, "override": LayerOverride kwargs), when it is one
    change: dict | None = None
    measured: float | None = None  # output SQNR (dB) after quantizing with ``change`` (``verify=True``)


@dataclass(frozen=True)
class TroubleshootReport:
    comparison: Comparison
    flagged: tuple[str, ...]  # degraded layers, worst first
    findings: tuple[Finding, ...]
    config: TroubleshootConfig
    # verify=True: output SQNR of the unchanged settings quantized again on the troubleshooting data,
    # the value each Finding.measured compares with
    verify_baseline: float | None = None

    def causes(self, node: str) -> list[str]:
        return [f.cause for f in self.findings if f.node == node]

    def summary(self) -> str:
        c = self.comparison
        out = c.output
        lines = ["output: " + ", ".join(f"{m} {format_value(out[m])}" for m in c.metrics),
                 f"{len(self.flagged)} of {len(c.layers)} layers flagged"
                 + (f": {', '.join(self.flagged[:8])}{' ...' if len(self.flagged) > 8 else ''}" if self.flagged
                    else "")]
        inherited = [f.node for f in self.findings if f.cause == "inherited"]
        for f in self.findings:
            if f.cause != "inherited":
                where = f" (loss seen at {f.seen_at})" if f.seen_at else ""
                tried = ""
                if f.measured is not None and self.verify_baseline is not None:
                    base = self.verify_baseline
                    verdict = "better" if f.measured > base + 0.5 else ("worse" if f.measured < base - 0.5
                                                                        else "no change")
                    tried = (f" [tried: output SQNR {format_value(f.measured)} dB vs {format_value(base)} without it: "
                             f"{verdict}]")
                lines.append(f"- {f.node}{where}: {f.cause}. {f.evidence} Try: {f.knob}{tried}")
        if inherited:
            lines.append(f"- {len(inherited)} flagged layers only carry a flagged input's loss: "
                         f"{', '.join(inherited[:6])}{' ...' if len(inherited) > 6 else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "flagged": list(self.flagged), "verify_baseline": self.verify_baseline,
                "findings": [asdict(f) for f in self.findings], "comparison": self.comparison.to_dict()}

    def write(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        """Write ``report.json`` and ``report.html`` into ``out_dir``; returns their paths."""
        os.makedirs(out_dir, exist_ok=True)
        json_path, html_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.html")
        with open(json_path, "w") as f:
            json.dump(jsonable(self.to_dict()), f, indent=1)
        with open(html_path, "w") as f:
            f.write(render_html(self))
        return json_path, html_path
