"""Insert quantizer modules where the TPC annotations ask for them.

Reads ``node.meta["mct_fx"]`` (see :mod:`mct_fx.tpc.matching`):

* an :class:`ActivationQuantizer` after every node whose output is quantized;
* a :class:`WeightQuantizer` on the kernel (and the bias, when the target
  quantizes it) of every Conv/ConvTranspose/FullyConnected node in functional
  form.

Each quantizer node records a :class:`mct_fx.meta.QuantizerRole` (the node it
serves, in which role); its module is named ``<node>_act_quant`` /
``<node>_weight_quant`` / ``<node>_bias_quant`` for people to read, never parsed.

New quantizers start in ``observe`` mode, on the device of what they quantize
(the weight's; the model's for activations), so no grid crosses devices per
call.  The pass is deterministic, so a model prepared twice has identical
module names and ``state_dict`` keys.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from mct_fx.graph_utils import attr_value, model_device
from mct_fx.meta import QUANTIZER, QuantizerRole, Role, quantizer_name
from mct_fx.quantizers.lut import LutActivationQuantizer, LutWeightQuantizer
from mct_fx.quantizers.modules import ActivationQuantizer, WeightQuantizer
from mct_fx.tpc.matching import annotation
from mct_fx.tpc.schema import AttributeQuantConfig, Signedness
from mct_fx.tpc.vocabulary import LINEAR_OPS

__all__ = ["insert_quantizers", "weight_quantizer", "SIGNEDNESS"]

_TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
SIGNEDNESS = {Signedness.AUTO: None, Signedness.SIGNED: True, Signedness.UNSIGNED: False}
_CLIPS_NEGATIVES = ("ReLU", "ReLU6")


def weight_quantizer(cfg: AttributeQuantConfig, tensor, axis: int) -> WeightQuantizer:
    """An observing quantizer for ``tensor`` as ``cfg`` asks (per channel along ``axis`` when per-channel)."""
    channels = tensor.shape[axis] if cfg.per_channel and tensor.dim() > 0 else None
    cls = LutWeightQuantizer if cfg.method.is_lut else WeightQuantizer
    return cls(cfg.method, cfg.n_bits, channels=channels, axis=axis)


def _insert_weight_quantizer(gm: fx.GraphModule, node: fx.Node, index: int, role: Role,
                             cfg: AttributeQuantConfig, axis: int) -> None:
    source = node.args[index] if len(node.args) > index else None
    tensor = attr_value(gm, source)
    if not cfg.enabled or tensor is None:
        return
    name = quantizer_name(node.name, role)
    gm.add_submodule(name, weight_quantizer(cfg, tensor, axis if tensor.dim() > 1 else 0).to(tensor.device))
    with gm.graph.inserting_before(node):
        q = gm.graph.call_module(name, (source,))
    q.meta[QUANTIZER] = QuantizerRole(node.name, role)
    node.update_arg(index, q)


def _only_relu_users(node: fx.Node) -> bool:
    """Every consumer maps negatives to 0 (ReLU / ReLU6): an unsigned grid loses nothing.

    With an unsigned grid the MSE of negative values is the same for every
    threshold, so the search picks the threshold the ReLU output would get.
    """
    users = list(node.users)
    return bool(users) and all((annotation(u) is not None and annotation(u).op in _CLIPS_NEGATIVES) for u in users)


def insert_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Insert quantizers from the annotations, in place; returns ``gm``."""
    device = model_device(gm)
    for node in list(gm.graph.nodes):
        ann = annotation(node)
        if ann is None or ann.config is None:
            continue
        cfg = ann.config
        if ann.op in LINEAR_OPS and node.op == "call_function":
            axis = 1 if node.target in _TRANSPOSED else 0
            _insert_weight_quantizer(gm, node, 1, Role.WEIGHT, cfg.kernel, axis)
            _insert_weight_quantizer(gm, node, 2, Role.BIAS, cfg.bias, 0)
        if ann.quantize_output:
            name = quantizer_name(node.name, Role.ACTIVATION)
            signed = SIGNEDNESS[cfg.signedness]
            if signed is None and _only_relu_users(node):
                signed = False  # negatives become 0 downstream anyway: spend every code on the positive side
            cls = LutActivationQuantizer if cfg.activation_method.is_lut else ActivationQuantizer
            gm.add_submodule(name, cls(cfg.activation_method, cfg.activation_n_bits, signed).to(device))
            with gm.graph.inserting_after(node):
                q = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
            q.meta[QUANTIZER] = QuantizerRole(node.name, Role.ACTIVATION)
            if "tensor_meta" in node.meta:
                q.meta["tensor_meta"] = node.meta["tensor_meta"]
    gm.graph.lint()
    gm.recompile()
    return gm
