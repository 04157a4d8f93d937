"""Which output channels of a GraphModule can be removed together: coupled channel sections.

A Conv/ConvTranspose/Linear layer (an *entry*) creates a channel space: its
output channels.  The space flows through channel-wise ops (activations,
pooling, dropout, BatchNorm, depthwise convs, flatten into a linear layer) to
the layers that contract it (*exits*: the next conv/linear reads those input
channels).  Element-wise ops between two tensors couple their channels: channel
``i`` of one must go wherever channel ``i`` of the other goes, so the spaces are
merged (a residual stream is one section with many entries).  Concatenation
along channels lays spaces side by side.  A *section* is a set of merged spaces,
all of one channel count; removing channel ``i`` of a section removes it from
every entry, every channel-wise parameter and every exit that sees it.  A
grouped conv with as many outputs as inputs is channel-wise over whole groups:
its section keeps or drops aligned blocks of ``channels / groups`` channels (a
depthwise conv: blocks of one).

A section is *frozen* (kept whole) when its channels reach anything that is not
understood (an unknown op, a reshape, the model's output, a grouped conv, a
shared weight): pruning it would change a shape someone else relies on.

Works on a functionalized graph (``F.conv2d(x, weight, bias, ...)`` with
``get_attr`` parameters) with ``tensor_meta`` recorded; channels on axis 1.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from mct_fx.graph_utils import TRANSPOSED_CONVS, attr_value, groups_of
from mct_fx.tpc.vocabulary import ACTIVATION_OPS, LINEAR_OPS, op_name

__all__ = ["Segment", "Section", "ChannelSections", "find_sections", "keep_index", "weight_axes"]

# ops that keep every channel where it is and mix nothing across channels (their first argument is the tensor)
_CHANNELWISE = frozenset(ACTIVATION_OPS) - {"PReLU"} | {"Dropout", "Identity", "MaxPool", "AvgPool", "Resize",
                                                      "Cast", "ZeroPadding2D"}
_BINARY = ("Add", "Sub", "Mul", "Div", "Min", "Max")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive channels of section ``section``; each spans ``repeat`` features (after a flatten)."""

    section: int
    size: int
    repeat: int = 1


@dataclass
class Section:
    """Coupled channels pruned as one: every entry's output channels and every reader of them."""

    index: int
    channels: int
    entries: list[str] = field(default_factory=list)  # layers whose output channels these are
    frozen: str | None = None  # why the section must stay whole (None: prunable)
    block: int = 1  # channels are kept or removed in aligned blocks of this many (grouped convs)


@dataclass
class ChannelSections:
    """The sections of a graph and the nodes that read them.

    ``params``: channel-wise layers with parameters (BatchNorm, PReLU, depthwise
    conv) and the segments of their input; ``exits``: layers contracting their
    input channels and the segments of that input.
    """

    sections: list[Section]
    entries: dict[str, int]  # entry layer -> its section
    params: dict[str, list[Segment]]
    exits: dict[str, list[Segment]]

    @property
    def prunable(self) -> list[Section]:
        return [s for s in self.sections if s.frozen is None and s.channels > s.block]


def keep_index(segments: list[Segment], keep: dict[int, Tensor]) -> Tensor:
    """Indices of the features to keep along an axis laid out as ``segments`` (sections absent from
    ``keep`` keep everything)."""
    parts, offset = [], 0
    for seg in segments:
        channels = keep.get(seg.section)
        if channels is None:
            channels = torch.arange(seg.size)
        idx = offset + channels.unsqueeze(1) * seg.repeat + torch.arange(seg.repeat)
        parts.append(idx.flatten())
        offset += seg.size * seg.repeat
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def weight_axes(node: fx.Node) -> tuple[int, int]:
    """``(output axis, input axis)`` of a conv/linear node's weight."""
    return (1, 0) if node.target in TRANSPOSED_CONVS else (0, 1)


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}
        self.block: dict[int, int] = {}  # root space -> channels that go together (grouped convs)
        self.entry_of: dict[str, int] = {}
        self.params: dict[str, list[Segment]] = {}
        self.exits: dict[str, list[Segment]] = {}
        self.segs: dict[fx.Node, list[Segment] | None] = {}
        weights = [n.args[1] for n in gm.graph.nodes if self.is_layer(n)]
        self.shared = {t for t, c in Counter(w.target for w in weights if isinstance(w, fx.Node)).items() if c > 1}
        self.module_calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    # --- union-find over spaces
    def new_space(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if frozen:
            self.frozen[len(self.parent) - 1] = frozen
        return len(self.parent) - 1

    def root(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen and ra not in self.frozen:
                self.frozen[ra] = self.frozen[rb]
            if rb in self.block:
                self.constrain(ra, self.block.pop(rb))

    def constrain(self, space: int, block: int) -> None:
        r = self.root(space)
        self.block[r] = math.lcm(self.block.get(r, 1), block)

    def freeze(self, segs: list[Segment] | None, reason: str) -> None:
        for seg in segs or ():
            self.frozen.setdefault(self.root(seg.section), reason)

    # --- graph reading
    def is_layer(self, node: fx.Node) -> bool:
        return node.op == "call_function" and op_name(node, self.gm) in LINEAR_OPS and len(node.args) >= 2

    @staticmethod
    def shape(node: object) -> tuple | None:
        tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(tm, "shape", None)

    def channels(self, node: object) -> int | None:
        shape = self.shape(node)
        return int(shape[1]) if shape is not None and len(shape) >= 2 else None

    def rank(self, node: object) -> int | None:
        shape = self.shape(node)
        return len(shape) if shape is not None else None

    def input_segs(self, node: fx.Node) -> list[list[Segment]]:
        return [self.segs[a] for a in node.all_input_nodes if self.segs.get(a)]

    def run(self) -> ChannelSections:
        for node in self.gm.graph.nodes:
            self.segs[node] = self.visit(node)
        roots: dict[int, Section] = {}
        for space in range(len(self.parent)):
            r = self.root(space)
            if r not in roots:
                roots[r] = Section(len(roots), self.size[r], frozen=self.frozen.get(r), block=self.block.get(r, 1))
        entries = {}
        for name, space in self.entry_of.items():
            section = roots[self.root(space)]
            section.entries.append(name)
            entries[name] = section.index

        def remap(segs: list[Segment]) -> list[Segment]:
            return [Segment(roots[self.root(s.section)].index, s.size, s.repeat) for s in segs]

        return ChannelSections(list(roots.values()), entries, {k: remap(v) for k, v in self.params.items()},
                               {k: remap(v) for k, v in self.exits.items()})

    def visit(self, node: fx.Node) -> list[Segment] | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for segs in self.input_segs(node):
                self.freeze(segs, "reaches the model output")
            return None
        if self.is_layer(node):
            return self.layer(node)
        op = op_name(node, self.gm)
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        ins = self.input_segs(node)
        if not ins:
            return None
        if isinstance(module, _BATCH_NORMS) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
            if self.module_calls[node.target] > 1:
                return self.opaque(node, f"module {node.target!r} (with parameters) is called more than once")
            return self.channelwise(node, record=True)
        if op in _CHANNELWISE or (op == "PReLU" and isinstance(module, nn.PReLU)):
            return self.channelwise(node)
        if op == "Pad" and module is None:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
            if isinstance(pad, (tuple, list)) and len(pad) <= 2 * ((self.rank(node) or 0) - 2):
                return self.channelwise(node)
        if op == "Pad" and isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
            return self.channelwise(node)
        if op == "Mean":
            return self.mean(node)
        if op == "Flatten":
            return self.flatten(node, module)
        if op in _BINARY:
            return self.elementwise(node, node.all_input_nodes)
        if op == "Concatenate":
            return self.concat(node)
        if op == "Size" and node.op == "call_method" and node.target == "size" and node.args[1:2] in ((0,), (-4,)):
            return None  # the batch size
        return self.opaque(node, f"read by {node.name!r}, an op pruning does not see through")

    def opaque(self, node: fx.Node, reason: str) -> None:
        for segs in self.input_segs(node):
            self.freeze(segs, reason)
        return None

    def channelwise(self, node: fx.Node, record: bool = False) -> list[Segment] | None:
        x = node.args[0] if node.args else None
        segs = self.segs.get(x) if isinstance(x, fx.Node) else None
        others = [s for a, s in ((a, self.segs.get(a)) for a in node.all_input_nodes) if s and a is not x]
        for s in others:
            self.freeze(s, f"a channel-wise op {node.name!r} reads it as a second argument")
        if segs is None:
            return self.opaque(node, f"{node.name!r} reads it in an unexpected position")
        if record:
            self.params[node.name] = segs
        return segs

    def mean(self, node: fx.Node) -> list[Segment] | None:
        rank = self.rank(node.args[0]) or 0
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) for d in dims):
            dims = {d % rank for d in dims}
            if 0 not in dims and 1 not in dims:
                return self.channelwise(node)
        return self.opaque(node, f"{node.name!r} reduces over the channels")

    def flatten(self, node: fx.Node, module: nn.Module | None) -> list[Segment] | None:
        x = node.args[0]
        rank = self.rank(x) or 0
        if module is not None:
            start, end = module.start_dim, module.end_dim
        else:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        segs = self.segs.get(x)
        if segs is None or not (isinstance(start, int) and isinstance(end, int)) or start % rank != 1 \
                or end % rank != rank - 1:
            return self.opaque(node, f"{node.name!r} flattens the channels with other axes than the trailing ones")
        spatial = math.prod(self.shape(x)[2:])
        return [Segment(s.section, s.size, s.repeat * spatial) for s in segs]

    def elementwise(self, node: fx.Node, operands: list[fx.Node]) -> list[Segment] | None:
        out_rank, out_c = self.rank(node), self.channels(node)
        segmented = [self.segs[a] for a in operands if self.segs.get(a)]
        problem = None
        for a in operands:
            if self.segs.get(a):
                if self.rank(a) != out_rank or self.channels(a) != out_c:
                    problem = f"{node.name!r} broadcasts it over other channels"
            elif self.rank(a) is not None:
                axis = 1 - (out_rank - self.rank(a))
                if axis >= 0 and self.rank(a) > axis and self.shape(a)[axis] != 1:
                    problem = f"{node.name!r} combines it with a tensor from no prunable layer"
        first = segmented[0]
        for other in segmented[1:]:
            if [(s.size, s.repeat) for s in other] != [(s.size, s.repeat) for s in first]:
                problem = problem or f"{node.name!r} combines differently concatenated channels"
        if problem:
            for segs in segmented:
                self.freeze(segs, problem)
            return first
        for other in segmented[1:]:
            for a, b in zip(first, other, strict=True):
                self.union(a.section, b.section)
        return first

    def concat(self, node: fx.Node) -> list[Segment] | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = self.rank(node)
        if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, fx.Node) for t in tensors) \
                or not isinstance(dim, int) or rank is None:
            return self.opaque(node, f"{node.name!r} concatenates something pruning cannot follow")
        if dim % rank != 1:
            return self.elementwise(node, list(tensors))
        out = []
        for t in tensors:
            segs = self.segs.get(t)
            if not segs:
                c = self.channels(t)
                if c is None:
                    return self.opaque(node, f"{node.name!r} concatenates a tensor of unknown shape")
                segs = [Segment(self.new_space(c, "concatenated with channels from no prunable layer"), c)]
            out.extend(segs)
        return out

    def layer(self, node: fx.Node) -> list[Segment] | None:
        x, w_node = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        w = attr_value(self.gm, w_node)
        in_segs = self.segs.get(x) if isinstance(x, fx.Node) else None
        out_axis, in_axis = weight_axes(node)
        problem = None
        if not isinstance(w, nn.Parameter) or (bias is not None and attr_value(self.gm, bias) is None):
            problem = f"layer {node.name!r} does not read its weight/bias as plain parameters"
        elif w_node.target in self.shared:
            problem = f"layer {node.name!r} shares its weight with another layer"
        elif self.rank(node) is None or (node.target is torch.nn.functional.linear and self.rank(node) != 2):
            problem = f"layer {node.name!r} keeps its channels on an axis other than 1"
        if problem:
            self.freeze(in_segs, problem)
            return [Segment(self.new_space(self.channels(node) or 1, problem), self.channels(node) or 1)]
        groups = groups_of(node)
        in_channels = self.channels(x) or 0
        out_channels = self.channels(node)
        if groups > 1:
            block = in_channels // groups  # channels per group: pruned whole, inputs and outputs alike
            if in_segs and in_channels == out_channels and w.shape[1] == block and (block == 1 or len(in_segs) == 1):
                for seg in in_segs:
                    self.constrain(seg.section, block)
                self.params[node.name] = in_segs
                return in_segs
            reason = f"grouped convolution {node.name!r} ({groups} groups, {in_channels} -> {out_channels})"
            self.freeze(in_segs, reason)
            return [Segment(self.new_space(out_channels, reason), out_channels)]
        if in_segs:
            if sum(s.size * s.repeat for s in in_segs) != w.shape[in_axis]:
                self.freeze(in_segs, f"layer {node.name!r} reads its input in an unexpected layout")
            else:
                self.exits[node.name] = in_segs
        space = self.new_space(out_channels)
        self.entry_of[node.name] = space
        return [Segment(space, out_channels)]


def find_sections(gm: fx.GraphModule) -> ChannelSections:
    """The coupled channel sections of ``gm`` (functionalized, with ``tensor_meta``)."""
    return _Builder(gm).run()
