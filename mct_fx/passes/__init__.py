"""Graph passes: one transformation per file, each editing a GraphModule in place."""

from mct_fx.passes.calibrate import calibrate
from mct_fx.passes.fold_bn import fold_batchnorm
from mct_fx.passes.freeze import freeze_quantizers
from mct_fx.passes.functionalize import functionalize_layers
from mct_fx.passes.insert_quantizers import insert_quantizers

__all__ = ["calibrate", "fold_batchnorm", "freeze_quantizers", "functionalize_layers", "insert_quantizers"]
