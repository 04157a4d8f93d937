"""Target Platform Capabilities: schema, JSON I/O, op vocabulary, built-in targets, graph matching."""

from mct_fx.tpc.builtin import BUILTIN_TPCS, get_tpc
from mct_fx.tpc.derive import with_bits
from mct_fx.tpc.io import load_tpc, save_tpc, tpc_from_dict, tpc_to_dict
from mct_fx.tpc.schema import (
    AttributeQuantConfig,
    Fusing,
    OperatorSet,
    OpQuantConfig,
    QuantConfigOptions,
    Signedness,
    TargetPlatformCapabilities,
    TPCError,
)

__all__ = [
    "AttributeQuantConfig", "Fusing", "OperatorSet", "OpQuantConfig", "QuantConfigOptions", "Signedness",
    "TargetPlatformCapabilities", "TPCError", "BUILTIN_TPCS", "get_tpc", "load_tpc", "save_tpc",
    "tpc_from_dict", "tpc_to_dict", "with_bits",
]
