"""The op vocabulary: which operator-set name a torch.fx node belongs to.

Names follow Sony MCT's ``OperatorSetNames`` where one exists ("Conv",
"FullyConnected", "ReLU", "Swish", ...), so TPCs read the same; a few ops MCT
has no name for get one here ("MatMul", "LayerNorm", "Mean", "Identity",
"Attention").  A node whose op is not in the vocabulary gets ``None``: it stays
float and is listed in the quantization report.

Detection post-processing from Sony's ``edgemdt_cl`` (NMS, box decoding) is
known by qualified name, so the package stays optional: :data:`POSTPROCESS_OPS`
(see :data:`EXTERNAL_OPS`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from mct_fx.quantizers.clamp import BoundedReLU

__all__ = ["op_name", "external_op", "MODULE_OPS", "FUNCTION_OPS", "METHOD_OPS", "EXTERNAL_OPS", "LINEAR_OPS",
           "ACTIVATION_OPS", "POSTPROCESS_OPS", "UNIT_RANGE_OPS"]

MODULE_OPS: dict[type, str] = {
    nn.Conv1d: "Conv", nn.Conv2d: "Conv", nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose", nn.ConvTranspose2d: "ConvTranspose", nn.ConvTranspose3d: "ConvTranspose",
    nn.Linear: "FullyConnected",
    nn.BatchNorm1d: "BatchNorm", nn.BatchNorm2d: "BatchNorm", nn.BatchNorm3d: "BatchNorm",
    nn.LayerNorm: "LayerNorm", nn.GroupNorm: "GroupNorm",
    nn.ReLU: "ReLU", nn.ReLU6: "ReLU6", nn.Hardtanh: "HardTanh", BoundedReLU: "HardTanh",
    nn.LeakyReLU: "LeakyReLU", nn.PReLU: "PReLU",
    nn.ELU: "Elu", nn.SiLU: "Swish", nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid",
    nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.GELU: "Gelu", nn.Mish: "Mish",
    nn.Softmax: "Softmax", nn.LogSoftmax: "LogSoftmax",
    nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.MaxPool3d: "MaxPool",
    nn.AdaptiveMaxPool1d: "MaxPool", nn.AdaptiveMaxPool2d: "MaxPool", nn.AdaptiveMaxPool3d: "MaxPool",
    nn.AvgPool1d: "AvgPool", nn.AvgPool2d: "AvgPool", nn.AvgPool3d: "AvgPool",
    nn.AdaptiveAvgPool1d: "AvgPool", nn.AdaptiveAvgPool2d: "AvgPool", nn.AdaptiveAvgPool3d: "AvgPool",
    nn.Flatten: "Flatten", nn.Unflatten: "Reshape",
    nn.Dropout: "Dropout", nn.Dropout1d: "Dropout", nn.Dropout2d: "Dropout", nn.Dropout3d: "Dropout",
    nn.AlphaDropout: "Dropout", torchvision.ops.StochasticDepth: "Dropout", nn.Identity: "Identity",
    nn.ZeroPad2d: "ZeroPadding2D", nn.ConstantPad2d: "Pad",
    nn.Upsample: "Resize", nn.UpsamplingNearest2d: "Resize", nn.UpsamplingBilinear2d: "Resize",
    # nn.MultiheadAttention is deliberately absent: it is a leaf holding linear layers that would
    # stay float unseen; as an unknown op it is reported as left float.
}

FUNCTION_OPS: dict[Any, str] = {
    F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv",
    F.conv_transpose1d: "ConvTranspose", F.conv_transpose2d: "ConvTranspose", F.conv_transpose3d: "ConvTranspose",
    F.linear: "FullyConnected",
    torch.matmul: "MatMul", operator.matmul: "MatMul", torch.bmm: "MatMul",
    torch.add: "Add", operator.add: "Add", operator.iadd: "Add",
    torch.sub: "Sub", operator.sub: "Sub", operator.isub: "Sub",
    torch.mul: "Mul", operator.mul: "Mul", operator.imul: "Mul",
    torch.div: "Div", operator.truediv: "Div",
    torch.minimum: "Min", torch.maximum: "Max",
    torch.cat: "Concatenate", torch.concat: "Concatenate", torch.stack: "Stack", torch.unbind: "Unstack",
    torch.relu: "ReLU", F.relu: "ReLU", F.relu6: "ReLU6", F.hardtanh: "HardTanh", F.leaky_relu: "LeakyReLU",
    F.prelu: "PReLU", F.elu: "Elu", F.silu: "Swish", F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh", F.gelu: "Gelu",
    F.mish: "Mish", F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.max_pool1d: "MaxPool", F.max_pool2d: "MaxPool", F.max_pool3d: "MaxPool",
    F.adaptive_max_pool2d: "MaxPool",
    F.avg_pool1d: "AvgPool", F.avg_pool2d: "AvgPool", F.avg_pool3d: "AvgPool",
    F.adaptive_avg_pool1d: "AvgPool", F.adaptive_avg_pool2d: "AvgPool", F.adaptive_avg_pool3d: "AvgPool",
    torch.mean: "Mean",
    torch.flatten: "Flatten", torch.reshape: "Reshape", torch.permute: "Permute", torch.transpose: "Transpose",
    torch.squeeze: "Squeeze", torch.unsqueeze: "Unsqueeze", torch.split: "SplitChunk", torch.chunk: "SplitChunk",
    operator.getitem: "GetItem", getattr: "Shape",
    F.dropout: "Dropout", torchvision.ops.stochastic_depth: "Dropout", F.pad: "Pad", F.interpolate: "Resize",
    F.batch_norm: "BatchNorm", F.layer_norm: "LayerNorm", F.group_norm: "GroupNorm",
    F.normalize: "L2Norm", torch.exp: "Exp", torch.sin: "Sin", torch.cos: "Cos",
    torch.gather: "Gather", torch.argmax: "ArgMax", torch.topk: "TopK", torch.eq: "Equal", operator.eq: "Equal",
    F.scaled_dot_product_attention: "Attention",
}

METHOD_OPS: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "relu": "ReLU", "relu_": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh",
    "softmax": "Softmax", "mean": "Mean", "exp": "Exp",
    "view": "Reshape", "reshape": "Reshape", "flatten": "Flatten", "permute": "Permute",
    "transpose": "Transpose", "squeeze": "Squeeze", "unsqueeze": "Unsqueeze", "expand": "Expand",
    "chunk": "SplitChunk", "split": "SplitChunk", "unbind": "Unstack",
    "contiguous": "Identity", "clone": "Identity", "detach": "Identity",
    "size": "Size", "dim": "Size", "to": "Cast", "type": "Cast", "float": "Cast", "gather": "Gather",
}

# Sony's edgemdt_cl layers by qualified name (functions, nn.Module classes, torch.library ops): the
# post-processing the IMX500 converter runs on the chip, left float with quantized inputs.
EXTERNAL_OPS: dict[str, str] = {
    "edgemdt_cl.pytorch.nms.nms.multiclass_nms": "MulticlassNMS",
    "edgemdt_cl.pytorch.nms.nms.MulticlassNMS": "MulticlassNMS",
    "edgemdt::multiclass_nms": "MulticlassNMS",
    "edgemdt_cl.pytorch.nms.nms_with_indices.multiclass_nms_with_indices": "MulticlassNMSWithIndices",
    "edgemdt_cl.pytorch.nms.nms_with_indices.MulticlassNMSWithIndices": "MulticlassNMSWithIndices",
    "edgemdt::multiclass_nms_with_indices": "MulticlassNMSWithIndices",
    "edgemdt_cl.pytorch.nms_obb.nms_obb.multiclass_nms_obb": "MulticlassNMSOBB",
    "edgemdt_cl.pytorch.nms_obb.nms_obb.MulticlassNMSOBB": "MulticlassNMSOBB",
    "edgemdt::multiclass_nms_obb": "MulticlassNMSOBB",
    "edgemdt_cl.pytorch.box_decode.box_decode.FasterRCNNBoxDecode": "BoxDecode",
    "edgemdt::faster_rcnn_box_decode": "BoxDecode",
}
POSTPROCESS_OPS = ("MulticlassNMS", "MulticlassNMSWithIndices", "MulticlassNMSOBB", "BoxDecode")

# Operators that carry a weight (kernel) and optional bias; the node's args are (input, weight, bias, ...).
LINEAR_OPS = ("Conv", "ConvTranspose", "FullyConnected")
# Element-wise activations (used by built-in TPCs' fusing patterns).
ACTIVATION_OPS = ("ReLU", "ReLU6", "LeakyReLU", "HardTanh", "Swish", "HardSwish", "PReLU", "Sigmoid", "Tanh",
                  "Gelu", "Elu", "HardSigmoid", "Mish")
# Operators whose outputs lie in [0, 1] (probabilities, gates).
UNIT_RANGE_OPS = ("Softmax", "Sigmoid", "HardSigmoid")


def op_name(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Operator-set name of ``node`` (None for ops the vocabulary does not know)."""
    if node.op == "call_module":
        # exact types only: a subclass may override forward with anything
        module_type = type(gm.get_submodule(node.target))
        return MODULE_OPS.get(module_type) or external_op(module_type)
    if node.op == "call_function":
        try:
            return FUNCTION_OPS.get(node.target) or external_op(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_OPS.get(node.target)
    return None


def external_op(target: Any) -> str | None:
    """The operator-set name of an ``edgemdt_cl`` function, module class or ``torch.library`` op; else None."""
    qualified = getattr(target, "_qualified_op_name", None)  # an OpOverloadPacket
    if qualified is None and callable(getattr(target, "name", None)) and hasattr(target, "overloadpacket"):
        qualified = target.overloadpacket._qualified_op_name  # an OpOverload
    if qualified is None:
        qualified = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
    return EXTERNAL_OPS.get(qualified)
