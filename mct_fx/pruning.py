"""Hardware-aware structured pruning: remove SIMD-sized groups of output channels to meet a weights budget.

``prune`` traces the model, finds the coupled channel sections
(:mod:`mct_fx.channel_sections`), scores every channel, and keeps, section by
section, the most important SIMD groups until the float32 weights memory target
is met; the removed channels leave every tensor that held them
(:mod:`mct_fx.passes.prune_channels`).  The result is a smaller float
GraphModule: fine-tune it like any model, then quantize it.

Scores (``Importance``): ``lfh``, the label-free Hessian estimate of what
removing the channel costs at the model output, ``sum(diag(H) * w**2)`` over the
channel's weights in every entry of the section (the trace of the channel's
Hessian times its squared norm when the diagonal is flat); ``l1`` / ``l2``, the
channel's weight norm relative to its section's mean.  A SIMD group's score is
the sum of its channels'; groups are added by score per byte (a greedy
knapsack), a section's groups in order of their score, so a kept channel always
scores at least as high as a removed one of its section.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from mct_fx.channel_sections import ChannelSections, find_sections, weight_axes
from mct_fx.data import ModelInputs, batch_size, iter_batches, take_images, to_device
from mct_fx.graph_utils import attr_value, model_device, placeholder_values, with_outputs
from mct_fx.hessian import Granularity, HessianConfig, HessianService
from mct_fx.meta import PRUNING
from mct_fx.passes.functionalize import functionalize_layers
from mct_fx.passes.prune_channels import prune_channels
from mct_fx.resources import ResourceUtilization
from mct_fx.tpc.builtin import get_tpc
from mct_fx.tpc.schema import TargetPlatformCapabilities
from mct_fx.tpc.vocabulary import op_name
from mct_fx.trace import propagate_shapes, trace

__all__ = ["prune", "PruningConfig", "PruningInfo", "Importance", "LayerPruning", "SectionPruning",
           "PRUNING_KEY"]

log = logging.getLogger("mct_fx")
PRUNING_KEY = PRUNING
BYTES_PER_PARAM = 4  # the budget is on the float32 model


class Importance(str, enum.Enum):
    LFH = "lfh"
    L1 = "l1"
    L2 = "l2"


@dataclass(frozen=True)
class PruningConfig:
    """``n_images``: calibration images for the Hessian and the mean compensation of removed channels;
    ``simd_size``: overrides the target's SIMD width (channels kept per group)."""

    importance: Importance = Importance.LFH
    n_images: int = 32
    hessian: HessianConfig = field(default_factory=HessianConfig)
    simd_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "importance", Importance(self.importance))
        if not (isinstance(self.n_images, int) and self.n_images >= 1):
            raise ValueError(f"PruningConfig.n_images: expected a positive integer, got {self.n_images!r}")
        if self.simd_size is not None and not (isinstance(self.simd_size, int) and self.simd_size >= 1):
            raise ValueError(f"PruningConfig.simd_size: expected a positive integer or None, got {self.simd_size!r}")


@dataclass(frozen=True)
class LayerPruning:
    """One entry layer: the output channels it keeps (original indices), their section's channel scores."""

    section: int
    kept: tuple[int, ...]
    importance: tuple[float, ...]  # per original output channel
    params_before: int
    params_after: int


@dataclass(frozen=True)
class SectionPruning:
    index: int
    entries: tuple[str, ...]
    channels: int
    kept: int
    simd: int  # channels per group
    frozen: str | None  # why it was left whole


@dataclass(frozen=True)
class PruningInfo:
    """What ``prune`` did: per entry layer and per section; memory in float32 bytes."""

    layers: dict[str, LayerPruning]
    sections: tuple[SectionPruning, ...]
    weights_memory_before: float
    weights_memory_after: float
    target: float
    importance: Importance

    def __str__(self) -> str:
        rows = [f"pruning ({self.importance.value}): weights {self.weights_memory_before / 1024:.1f} KiB -> "
                f"{self.weights_memory_after / 1024:.1f} KiB (target {self.target / 1024:.1f} KiB)"]
        for s in self.sections:
            if s.frozen is None and s.kept < s.channels:
                rows.append(f"  section {s.index} ({', '.join(s.entries[:3])}{', ...' if len(s.entries) > 3 else ''}):"
                            f" {s.kept}/{s.channels} channels")
        return "\n".join(rows)


def prune(model: nn.Module, calib_loader: Iterable, target: ResourceUtilization,
          tpc: str | TargetPlatformCapabilities = "imx500", config: PruningConfig | None = None, *,
          n_batches: int | None = None, inplace: bool = False, leaf_modules: Iterable[type | str] = (),
          concrete_args: dict[str, Any] | None = None) -> tuple[fx.GraphModule, PruningInfo]:
    """Prune ``model``'s output channels, in groups of the target's SIMD width, to ``target.weights_memory``
    bytes of float32 parameters; returns the smaller GraphModule (eval mode) and a :class:`PruningInfo`.

    The target is never exceeded; a target at or above the model's size changes nothing.  The
    user's model is not modified unless ``inplace=True``.
    """
    config = config or PruningConfig()
    platform = get_tpc(tpc)
    budget = _budget(target)
    batches = _first_images(calib_loader, config.n_images, n_batches)
    gm = trace(model, batches[0], leaf_modules=leaf_modules, concrete_args=concrete_args, inplace=inplace)
    functionalize_layers(gm)
    batches = [to_device(b, model_device(gm)) for b in batches]
    sections = find_sections(gm)
    memory = _MemoryModel(gm, sections)
    full = {s.index: s.channels for s in sections.sections}
    before = memory.bytes(full)
    scores: dict[int, Tensor] = {}
    keep: dict[int, Tensor] = {}
    simd = _simd_widths(gm, sections, platform, config)
    params_before = _layer_params(gm, sections.entries)
    if budget < before:
        smallest = memory.bytes({**full, **{s.index: min(simd[s.index], s.channels) for s in sections.prunable}})
        if smallest > budget:
            raise ValueError(f"prune: the target weights_memory {budget:.0f} bytes is below the smallest model "
                             f"pruning can make ({smallest:.0f} bytes: one SIMD group per section, frozen "
                             "sections whole)")
        scores = _channel_scores(gm, sections, batches, config)
        keep = _select(sections, scores, simd, memory, budget)
        means = _exit_input_means(gm, sections, keep, batches)
        outputs = _output_shapes(gm)
        prune_channels(gm, sections, keep, means)
        propagate_shapes(gm, batches[0])
        if _output_shapes(gm) != outputs:  # pragma: no cover - a section analysis bug, never a user error
            raise RuntimeError("pruning changed the model's output shapes; please report this model")
    params = (params_before, _layer_params(gm, sections.entries))
    info = _info(sections, keep, scores, simd, params, memory, before, budget, config.importance)
    gm.meta[PRUNING_KEY] = info
    log.info("%s", info)
    return gm, info


def _budget(target: ResourceUtilization) -> float:
    if not isinstance(target, ResourceUtilization):
        raise TypeError(f"prune: target must be a ResourceUtilization, got {type(target).__name__}")
    others = [name for name, _ in target.items() if name != "weights_memory"]
    if target.weights_memory is None or others:
        raise ValueError("prune: the target must set weights_memory (bytes of float32 parameters) and nothing "
                         f"else; got {target.items()}")
    return float(target.weights_memory)


def _first_images(loader: Iterable, n: int, n_batches: int | None) -> list[ModelInputs]:
    out, count = [], 0
    for inputs in iter_batches(loader, n_batches):
        out.append(inputs)
        count += batch_size(inputs)
        if count >= n:
            break
    return take_images(out, n)


class _MemoryModel:
    """Float32 bytes of the graph's parameters as a function of the channels kept per section.

    Each parameter tensor read by a pruned layer has ``numel = unit * size(out axis) * size(in axis)``
    where an axis size is ``const + sum(repeat * kept[section])``; everything else is constant.
    """

    def __init__(self, gm: fx.GraphModule, sections: ChannelSections):
        self.terms: list[tuple[float, tuple[int, dict[int, int]], tuple[int, dict[int, int]]]] = []
        prunable = {s.index for s in sections.prunable}
        nodes = {n.name: n for n in gm.graph.nodes}
        counted: set[int] = set()

        def form(segs) -> tuple[int, dict[int, int]]:
            const, coeffs = 0, {}
            for seg in segs:
                if seg.section in prunable:
                    coeffs[seg.section] = coeffs.get(seg.section, 0) + seg.repeat
                else:
                    const += seg.size * seg.repeat
            return const, coeffs

        def add(t: Tensor, out: tuple, inp: tuple, out_size: int, in_size: int) -> None:
            self.terms.append((t.numel() / (out_size * in_size), out, inp))
            counted.add(id(t))

        for name in {*sections.entries, *sections.exits}:
            node = nodes[name]
            w = attr_value(gm, node.args[1])
            o, i = weight_axes(node)
            s = sections.entries.get(name)
            out = (0, {s: 1}) if s in prunable else (w.shape[o], {})
            inp = form(sections.exits[name]) if name in sections.exits else (w.shape[i], {})
            add(w, out, inp, w.shape[o], w.shape[i])
            bias = attr_value(gm, node.args[2]) if len(node.args) > 2 else None
            if bias is not None:
                add(bias, out, (1, {}), w.shape[o], 1)
        for name, segs in sections.params.items():
            node = nodes[name]
            tensors = [getattr(gm.get_submodule(node.target), a, None) for a in ("weight", "bias")] \
                if node.op == "call_module" else [attr_value(gm, a) for a in node.args[1:3]]
            for t in tensors:
                if isinstance(t, nn.Parameter):
                    add(t, form(segs), (1, {}), t.shape[0], 1)
        self.const = sum(p.numel() for p in gm.parameters() if id(p) not in counted)
        self.by_section: dict[int, list[int]] = {}
        for k, (_, out, inp) in enumerate(self.terms):
            for s in {*out[1], *inp[1]}:
                self.by_section.setdefault(s, []).append(k)

    @staticmethod
    def _size(f: tuple[int, dict[int, int]], kept: dict[int, int]) -> int:
        return f[0] + sum(r * kept[s] for s, r in f[1].items())

    def _term(self, k: int, kept: dict[int, int]) -> float:
        unit, out, inp = self.terms[k]
        return unit * self._size(out, kept) * self._size(inp, kept)

    def bytes(self, kept: dict[int, int]) -> float:
        return BYTES_PER_PARAM * (self.const + sum(self._term(k, kept) for k in range(len(self.terms))))

    def delta(self, kept: dict[int, int], section: int, new: int) -> float:
        """Bytes added when ``section`` keeps ``new`` channels instead of ``kept[section]``."""
        terms = self.by_section.get(section, [])
        before = sum(self._term(k, kept) for k in terms)
        after = sum(self._term(k, {**kept, section: new}) for k in terms)
        return BYTES_PER_PARAM * (after - before)


def _channel_scores(gm: fx.GraphModule, sections: ChannelSections, batches: list[ModelInputs],
                    config: PruningConfig) -> dict[int, Tensor]:
    """Score of every channel of every prunable section (summed over the section's entries)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    entries = [e for s in sections.prunable for e in s.entries]
    hessians = {}
    if config.importance is Importance.LFH:
        service = HessianService.from_model_inputs(gm, batches, config.hessian)
        hessians = service.weights(entries, Granularity.PER_ELEMENT)
    scores = {}
    for section in sections.prunable:
        total = torch.zeros(section.channels, dtype=torch.float64)
        for name in section.entries:
            w = attr_value(gm, nodes[name].args[1]).detach()
            axis = weight_axes(nodes[name])[0]
            if config.importance is Importance.LFH:
                per = hessians[name].to(w) * w ** 2
            else:
                per = w.abs() if config.importance is Importance.L1 else w ** 2
            per = per.movedim(axis, 0).reshape(w.shape[axis], -1).sum(1).double().cpu()
            total += per.sqrt() if config.importance is Importance.L2 else per
        if config.importance is not Importance.LFH:
            total = total / total.mean().clamp_min(1e-30)
        scores[section.index] = total
    return scores


def _simd_widths(gm: fx.GraphModule, sections: ChannelSections, platform: TargetPlatformCapabilities,
                 config: PruningConfig) -> dict[int, int]:
    """Channels per group of each prunable section: the SIMD width of its layers (their widest), in whole
    grouped-conv blocks."""
    nodes = {n.name: n for n in gm.graph.nodes}
    widths = {}
    for section in sections.prunable:
        width = config.simd_size or max(
            (platform.options_for(op_name(nodes[e], gm)).base.simd_size or 1 for e in section.entries), default=1)
        widths[section.index] = math.lcm(width, section.block)
    return widths


def _select(sections: ChannelSections, scores: dict[int, Tensor], simd: dict[int, int], memory: _MemoryModel,
            budget: float) -> dict[int, Tensor]:
    """Kept channel indices per prunable section: the first SIMD group of each, then the group with the most
    score per byte while the budget allows."""
    groups: dict[int, list[Tensor]] = {}
    for section in sections.prunable:
        block = section.block
        per_block = scores[section.index].reshape(-1, block).sum(1)
        order = torch.argsort(per_block, descending=True, stable=True)
        chunk = simd[section.index] // block
        groups[section.index] = [(order[i:i + chunk, None] * block + torch.arange(block)).flatten()
                                 for i in range(0, len(order), chunk)]
    kept = {s.index: s.channels for s in sections.sections}
    taken = {}
    for index, gs in groups.items():
        kept[index], taken[index] = len(gs[0]), 1
    used = memory.bytes(kept)  # within the budget: prune checked the smallest model first
    while True:
        best, best_ratio = None, -1.0
        for index, gs in groups.items():
            if taken[index] == len(gs):
                continue
            group = gs[taken[index]]
            cost = memory.delta(kept, index, kept[index] + len(group))
            if used + cost > budget * (1 + 1e-12):
                continue
            ratio = float(scores[index][group].sum()) / max(cost, 1e-12)
            if ratio > best_ratio:
                best, best_ratio, best_cost = index, ratio, cost
        if best is None:
            break
        kept[best] += len(groups[best][taken[best]])
        taken[best] += 1
        used += best_cost
    return {index: torch.cat(gs[:taken[index]]).sort().values for index, gs in groups.items()
            if taken[index] < len(gs)}


def _exit_input_means(gm: fx.GraphModule, sections: ChannelSections, keep: dict[int, Tensor],
                      batches: list[ModelInputs]) -> dict[str, Tensor]:
    """Per exit that loses inputs: the mean of each input feature over ``batches`` (axis 1)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    exits = [name for name, segs in sections.exits.items() if any(s.section in keep for s in segs)]
    if not exits:
        return {}
    inputs = list(dict.fromkeys(nodes[e].args[0].name for e in exits))
    probe = with_outputs(gm, inputs)
    sums: dict[str, Tensor] = {}
    count = 0
    with torch.no_grad():
        for args, kwargs in batches:
            values = probe(*placeholder_values(gm, args, kwargs))
            count += values[0].shape[0]
            for name, v in zip(inputs, values, strict=True):
                s = v.double().transpose(0, 1).reshape(v.shape[1], -1).sum(1) / (v.numel() / v.shape[0] / v.shape[1])
                sums[name] = sums[name] + s if name in sums else s
    return {e: (sums[nodes[e].args[0].name] / count).float() for e in exits}


def _output_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [tuple(getattr(a.meta.get("tensor_meta"), "shape", ())) for a in out.all_input_nodes]


def _layer_params(gm: fx.GraphModule, names: Iterable[str]) -> dict[str, int]:
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: sum(t.numel() for t in (attr_value(gm, a) for a in nodes[name].args[1:3]) if t is not None)
            for name in names}


def _info(sections: ChannelSections, keep: dict[int, Tensor], scores: dict[int, Tensor], simd: dict[int, int],
          params: tuple[dict[str, int], dict[str, int]], memory: _MemoryModel, before: float, budget: float,
          importance: Importance) -> PruningInfo:
    kept = {s.index: (len(keep[s.index]) if s.index in keep else s.channels) for s in sections.sections}
    layers = {}
    for name, index in sections.entries.items():
        channels = sections.sections[index].channels
        layers[name] = LayerPruning(
            section=index, kept=tuple(keep[index].tolist()) if index in keep else tuple(range(channels)),
            importance=tuple(scores[index].tolist()) if index in scores else (),
            params_before=params[0][name], params_after=params[1][name])
    sections_info = tuple(SectionPruning(s.index, tuple(s.entries), s.channels, kept[s.index],
                                         simd.get(s.index, s.channels), s.frozen) for s in sections.sections)
    return PruningInfo(layers, sections_info, before, memory.bytes(kept), budget, importance)
