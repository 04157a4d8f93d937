"""Quantization-aware training: a PTQ-initialised GraphModule that trains in the user's own loop.

``qat_prepare`` quantizes the model (PTQ) and makes it trainable: every
parameter (weights, biases) requires grad, and the quantizers pass
straight-through gradients ("ste") or also learn their grids ("lsq": scale, and
zero point of asymmetric grids, see :meth:`FakeQuantizer.learn_grid`).  It is
an ordinary ``torch.fx.GraphModule``: ``torch.compile`` and
``DistributedDataParallel`` take it as it is, and its output equals the PTQ
model's until it trains.  ``qat_finalize`` fixes the learned grids and returns
the quantized model (same modules and ``state_dict`` keys as PTQ's; export works).
"""

from __future__ import annotations

import copy
import enum
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from mct_fx.config import CONFIG_KEY, QuantConfig
from mct_fx.meta import QAT
from mct_fx.ptq import SUMMARY_KEY, TPCLike, quantize
from mct_fx.quant_summary import summarize
from mct_fx.quantizers.modules import FakeQuantizer, WeightQuantizer
from mct_fx.resources import ResourceUtilization
from mct_fx.tensorboard import TensorBoardLogger

__all__ = ["QATConfig", "QATMethod", "qat_prepare", "qat_finalize", "QAT_KEY"]

log = logging.getLogger("mct_fx")
QAT_KEY = QAT


class QATMethod(str, enum.Enum):
    STE = "ste"  # grids fixed at their PTQ values, straight-through gradients
    LSQ = "lsq"  # grids learned too (learned step size)


@dataclass(frozen=True)
class QATConfig:
    """``method``: "ste" or "lsq"; ``learn_activations`` / ``learn_weights``: which grids LSQ learns."""

    method: QATMethod = QATMethod.STE
    learn_activations: bool = True
    learn_weights: bool = True

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", QATMethod(self.method))
        except ValueError:
            raise ValueError(f"QATConfig.method: expected one of {[m.value for m in QATMethod]}, "
                             f"got {self.method!r}") from None


def qat_prepare(model: nn.Module, calib_loader: Iterable, tpc: TPCLike = "imx500", config: QATConfig | None = None,
                *, quant_config: QuantConfig | None = None, target: ResourceUtilization | None = None,
                n_batches: int | None = None, inplace: bool = False, verbose: bool = True,
                leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None
                ) -> fx.GraphModule:
    """PTQ of ``model`` (see :func:`mct_fx.quantize`), returned trainable and in train mode."""
    config = config or QATConfig()
    gm = quantize(model, calib_loader, tpc, quant_config, target=target, n_batches=n_batches, inplace=inplace,
                  verbose=verbose, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if config.method is QATMethod.LSQ:
        for name, q in gm.named_modules():
            if not isinstance(q, FakeQuantizer) or q.mode != "frozen":
                continue
            if not (config.learn_weights if isinstance(q, WeightQuantizer) else config.learn_activations):
                continue
            if q.affine:
                q.learn_grid(True)
            else:
                log.info("QAT: %s keeps its look-up table (straight-through gradients only)", name)
    for p in gm.parameters():
        p.requires_grad_(True)
    gm.meta[QAT_KEY] = config
    return gm.train()


def qat_finalize(qat_model: nn.Module) -> fx.GraphModule:
    """The trained model as a frozen quantized GraphModule (learned grids fixed; a copy, in eval mode).

    Accepts the module ``qat_prepare`` returned, or it wrapped in
    ``DistributedDataParallel`` / ``torch.compile``.
    """
    gm = qat_model.module if isinstance(qat_model, nn.parallel.DistributedDataParallel) else qat_model
    gm = getattr(gm, "_orig_mod", gm)  # torch.compile's wrapper
    if not isinstance(gm, fx.GraphModule) or QAT_KEY not in gm.meta:
        raise TypeError(f"qat_finalize expects the model qat_prepare returned, got {type(qat_model).__name__}")
    out = copy.deepcopy(gm)
    for q in out.modules():
        if isinstance(q, FakeQuantizer) and q.learning:
            q.learn_grid(False)
    del out.meta[QAT_KEY]
    previous = gm.meta.get(SUMMARY_KEY)
    out.meta[SUMMARY_KEY] = summarize(out, previous.mixed_precision if previous is not None else None)
    log_dir = getattr(out.meta.get(CONFIG_KEY), "log_dir", None)
    if log_dir is not None:  # the learned grids as their own run: TensorBoard overlays them on the PTQ ones
        board = TensorBoardLogger(os.path.join(log_dir, "qat_finalized"))
        board.thresholds(out)
        board.close()
    return out.eval()
