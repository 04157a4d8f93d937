"""Manual per-node settings: bit-widths chosen among the target's candidates, scheme and error method.

Runs on the annotations (after :func:`mct_fx.tpc.matching.annotate`, before
quantizers are inserted).  Each :class:`~mct_fx.config.LayerOverride` selects
nodes by name (node name or module path, ``fnmatch`` wildcards) and/or by
operator set; later overrides win; bit-widths (and schemes) set here are pinned:
mixed precision does not change them.  Bit-widths must be a candidate the target
offers for that node (16-bit activations need a target such as
``imx500_16bit``); the activation settings of a node inside a fused group go to
the group's output, which is where its activation is quantized.  Every problem
is reported before anything changes: an override that selects nothing, bits the
target does not offer, an activation width a consumer cannot read.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace

from torch import fx

from mct_fx.config import LayerOverride
from mct_fx.tpc.matching import Annotation, annotation
from mct_fx.tpc.schema import OpQuantConfig, TPCError

__all__ = ["apply_overrides", "module_path"]


def module_path(node: fx.Node) -> str | None:
    """Path of the module a node was traced in (``layer1.0.conv1``), if tracing recorded one."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack.values()))[0]


def _selects(override: LayerOverride, node: fx.Node, ann: Annotation) -> bool:
    if override.op is not None and ann.op != override.op:
        return False
    if override.name is None:
        return True
    path = module_path(node)
    return any(fnmatch.fnmatchcase(s, override.name) for s in (node.name, path) if s is not None)


def _candidate(node: fx.Node, current: OpQuantConfig, override: LayerOverride, a_bits: int | None,
               w_bits: int | None) -> OpQuantConfig:
    """The target's candidate for ``node`` with the requested bits, closest to ``current`` otherwise."""
    if a_bits is None and w_bits is None:
        return current
    ann = annotation(node)

    def fits(c: OpQuantConfig) -> bool:
        return ((a_bits is None or c.activation_n_bits == a_bits)
                and (w_bits is None or (c.kernel.enabled and c.kernel.n_bits == w_bits)))

    fitting = [c for c in ann.options.candidates if fits(c)]
    if not fitting:
        offered = sorted({(c.activation_n_bits, c.kernel.n_bits if c.kernel.enabled else None)
                          for c in ann.options.candidates}, key=str)
        raise TPCError(f"override {override.describe()}: node {node.name!r} ({ann.op}) has no candidate with "
                       f"activation bits {a_bits} / weight bits {w_bits}; the target offers "
                       f"(activation, weight) bits {offered}")
    # keep what was not asked for: prefer the candidate that matches the current one elsewhere
    return min(fitting, key=lambda c: (c.activation_n_bits != current.activation_n_bits)
               + (c.kernel.n_bits != current.kernel.n_bits))


def apply_overrides(gm: fx.GraphModule, overrides: tuple[LayerOverride, ...]) -> None:
    """Apply ``overrides`` to the annotations of ``gm``, in place, all or nothing."""
    if not overrides:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    configs: dict[str, OpQuantConfig] = {}
    errors: dict[str, dict] = {}
    pinned: dict[str, set] = {}
    for override in overrides:
        hits = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).options is not None
                and _selects(override, n, annotation(n))]
        if not hits:
            raise TPCError(f"override {override.describe()} selects no quantizable node")
        for node in hits:
            ann = annotation(node)
            current = configs.get(node.name, ann.config)
            configs[node.name] = _candidate(node, current, override, None, override.weights_n_bits)
            if override.weights_n_bits is not None:
                pinned.setdefault(node.name, set()).add("weights")
            if override.weights_error_method is not None:
                errors.setdefault(node.name, {})["weights"] = override.weights_error_method
            # activation settings belong to the node whose output is quantized
            out = nodes[ann.fused_into] if ann.fused_into else node
            out_config = _candidate(out, configs.get(out.name, annotation(out).config), override,
                                    override.activation_n_bits, None)
            if override.activation_method is not None:
                out_config = replace(out_config, activation_method=override.activation_method)
            if override.activation_n_bits is not None or override.activation_method is not None:
                pinned.setdefault(out.name, set()).add("activation")
            configs[out.name] = out_config
            if override.activation_error_method is not None:
                errors.setdefault(out.name, {})["activation"] = override.activation_error_method
    for name, config in configs.items():
        annotation(nodes[name]).config = config
    for name, methods in errors.items():
        annotation(nodes[name]).error_methods.update(methods)
    for name, kinds in pinned.items():
        annotation(nodes[name]).pinned.update(kinds)
    _check_consumers(gm)


def _check_consumers(gm: fx.GraphModule) -> None:
    """Every quantized activation's width is one its readers accept (through ops that do not requantize)."""

    def check(source: fx.Node, node: fx.Node, bits: int) -> None:
        for user in node.users:
            ann = annotation(user)
            if ann is None or ann.config is None:
                continue
            if bits not in ann.config.supported_input_activation_n_bits:
                raise TPCError(f"node {user.name!r} ({ann.op}) takes {bits}-bit input from {source.name!r}, but "
                               f"the target supports only {list(ann.config.supported_input_activation_n_bits)} "
                               f"bits there")
            if ann.fused_into is None and not ann.config.enable_activation_quantization:
                check(source, user, bits)  # passes the tensor on with the same grid

    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None and ann.quantize_output:
            check(node, node, ann.config.activation_n_bits)
