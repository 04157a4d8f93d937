"""Derive targets from targets: pick other candidates as the base configuration."""

from __future__ import annotations

from dataclasses import replace

from mct_fx.tpc.schema import OpQuantConfig, QuantConfigOptions, TargetPlatformCapabilities, TPCError

__all__ = ["with_bits"]


def _pick(options: QuantConfigOptions, where: str, weights: int | None, activations: int | None) -> QuantConfigOptions:
    base = options.base

    def fits(c: OpQuantConfig) -> bool:
        return ((weights is None or not c.kernel.enabled or c.kernel.n_bits == weights)
                and (activations is None or not c.enable_activation_quantization
                     or c.activation_n_bits == activations))

    def closeness(c: OpQuantConfig) -> int:  # keep what was not asked for as it was
        same_w = weights is not None or c.kernel.n_bits == base.kernel.n_bits
        same_a = activations is not None or c.activation_n_bits == base.activation_n_bits
        return int(same_w) + int(same_a)

    fitting = [c for c in options.candidates if fits(c)]
    if not fitting:
        asked = ", ".join(f"{k}={v}" for k, v in (("weights", weights), ("activations", activations)) if v)
        raise TPCError(f"{where}: no candidate configuration offers {asked} bits "
                       f"(candidates: {[(c.kernel.n_bits, c.activation_n_bits) for c in options.candidates]})")
    return replace(options, base=max(fitting, key=closeness))


def with_bits(tpc: TargetPlatformCapabilities, *, weights: int | None = None,
              activations: int | None = None) -> TargetPlatformCapabilities:
    """A copy of ``tpc`` whose base configurations use ``weights``-bit kernels and/or
    ``activations``-bit activations, chosen among each operator set's candidates
    (e.g. W4A8 PTQ on ``imx500``).  Raises :class:`TPCError` naming the operator
    set that offers no such candidate.
    """
    sets = tuple(s if s.options is None else replace(s, options=_pick(s.options, f"operator set {s.name!r}",
                                                                       weights, activations))
                 for s in tpc.operator_sets)
    default = _pick(tpc.default_options, "default_options", weights, activations)
    suffix = "".join(f"_{k[0]}{v}" for k, v in (("w", weights), ("a", activations)) if v)
    return replace(tpc, name=tpc.name + suffix, default_options=default, operator_sets=sets)
