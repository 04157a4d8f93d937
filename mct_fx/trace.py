"""Tracing front-end: ``nn.Module`` -> ``torch.fx.GraphModule`` with recorded shapes."""

from __future__ import annotations

import copy
import inspect
import linecache
import sys
import traceback
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from mct_fx.quantizers.modules import FakeQuantizer
from mct_fx.tpc.vocabulary import external_op

__all__ = ["TraceError", "Tracer", "trace", "propagate_shapes", "bind_inputs", "failing_node"]


_PLACEHOLDER = type(fx.PH)  # concrete_args value meaning "keep this input a placeholder"


class TraceError(RuntimeError):
    """The model cannot be traced by ``torch.fx``; the message names the module and line."""


class Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps mct_fx quantizers and user-listed modules as leaves.

    ``leaf_modules`` may hold module classes or qualified module names ("layer1.0").
    Sony's ``edgemdt_cl`` post-processing (NMS modules and functions, box decoding)
    is traced as one call each, whatever it does inside.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__(autowrap_functions=_postprocess_functions())
        leaf_modules = tuple(leaf_modules)
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = frozenset(n for n in leaf_modules if isinstance(n, str))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FakeQuantizer) or module_qualified_name in self._leaf_names or external_op(type(m)):
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Pieces(node, self) if _pieces(node) is not None else super().proxy(node)


class _Pieces(fx.Proxy):
    """The result of ``x.chunk(k)`` or ``x.split([sizes])``: the call says how many pieces there are, so
    it has a length and unpacks (YOLOv8's C2f: ``list(self.cv1(x).chunk(2, 1))``). A chunk count the
    tensor cannot give fails in shape propagation, naming the node."""

    def __len__(self) -> int:
        return _pieces(self.node)

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


def _pieces(node: fx.Node) -> int | None:
    """How many tensors ``node`` (a chunk / split call) returns, when its arguments say."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    key = "chunks" if name == "chunk" else "split_size_or_sections"
    count = node.args[1] if len(node.args) > 1 else node.kwargs.get(key, node.kwargs.get("split_size"))
    if name == "chunk":
        return count if isinstance(count, int) else None
    return len(count) if isinstance(count, (list, tuple)) else None


def _postprocess_functions() -> tuple:
    """The ``edgemdt_cl`` NMS functions, when the package is loaded (the model using them has imported it)."""
    package = sys.modules.get("edgemdt_cl.pytorch")
    names = ("multiclass_nms", "multiclass_nms_with_indices", "multiclass_nms_obb")
    return tuple(f for f in (getattr(package, n, None) for n in names) if f is not None) if package else ()


def trace(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None, *,
          leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None,
          inplace: bool = False) -> fx.GraphModule:
    """Trace ``model`` (a deep copy unless ``inplace``) in eval mode.

    With ``example_inputs`` (``(args, kwargs)``) shapes and dtypes are recorded on
    every node (``node.meta["tensor_meta"]``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    names = {n for n, _ in model.named_modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in names:
            raise TraceError(f"leaf_modules: the model has no submodule named {leaf!r}")
        if not isinstance(leaf, (str, type)):
            raise TypeError(f"leaf_modules: expected module classes or qualified names, got {leaf!r}")
    root = model if inplace else copy.deepcopy(model)
    root.eval()
    tracer = Tracer(leaf_modules)
    try:
        graph = tracer.trace(root, concrete_args)
    except Exception as e:  # noqa: BLE001 - anything fx raises becomes one clear error
        raise TraceError(_explain(e, root)) from e
    gm = fx.GraphModule(tracer.root, graph, type(root).__name__)
    if concrete_args:
        _inline_concrete_args(gm, root, concrete_args)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm


def _inline_concrete_args(gm: fx.GraphModule, root: nn.Module, concrete_args: dict[str, Any]) -> None:
    """Replace the placeholders fx keeps for ``concrete_args`` (renamed, with the *original*
    default and a guard) by their values, so the traced model is called without them."""
    names = [p for p in inspect.signature(root.forward).parameters]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for name, ph in zip(names, placeholders, strict=False):
        if name in concrete_args and not isinstance(concrete_args[name], _PLACEHOLDER):
            for user in list(ph.users):
                user.replace_input_with(ph, concrete_args[name])
            gm.graph.erase_node(ph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _explain(error: Exception, root: nn.Module) -> str:
    """Name the module and source line where tracing failed, and the escape hatches."""
    modules = {id(m): n for n, m in root.named_modules()}
    where, path, cls = None, None, None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in modules:
            path, cls = modules[id(owner)], type(owner).__name__
            where = (frame.f_code.co_filename, lineno)
    lines = [f"torch.fx could not trace {type(root).__name__}: {type(error).__name__}: {error}"]
    if where is not None:
        src = linecache.getline(where[0], where[1]).strip()
        lines.append(f"  in module {path or '<top level>'!r} ({cls}), {where[0]}:{where[1]}: {src}")
    hint = f"leaf_modules=[{path!r}]" if path else "leaf_modules=[<the submodule's name or class>]"
    lines.append(
        f"  Fix: keep that submodule opaque with {hint} (it then runs unquantized inside), "
        "or fix the data-dependent control flow with concrete_args={'<argument>': <value>}.")
    return "\n".join(lines)


def bind_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Positional inputs for ``gm``'s placeholders from ``args``/``kwargs``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = list(args)
    for ph in placeholders[len(args):]:
        if ph.target in kwargs:
            bound.append(kwargs[ph.target])
        elif ph.args:
            bound.append(ph.args[0])  # default value
        else:
            raise TypeError(f"missing model input {ph.target!r}")
    extra = set(kwargs) - {ph.target for ph in placeholders}
    if extra:
        raise TypeError(f"unexpected model inputs {sorted(extra)} (the model takes {[p.target for p in placeholders]})")
    return bound


class _Locator(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def failing_node(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[fx.Node | None, Exception | None]:
    """Run ``gm`` node by node; the node that raises and its error (None, None if it runs)."""
    loc = _Locator(gm)
    loc.current = None
    try:
        with torch.no_grad():
            loc.run(*bind_inputs(gm, args, kwargs))
    except Exception as e:  # noqa: BLE001
        return loc.current, e
    return None, None


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[tuple, dict]) -> None:
    """Record ``tensor_meta`` on every node by running ``example_inputs`` through ``gm``.

    When every input tensor has the same batch size, one sample is enough for shapes
    and dtypes (a full batch is the fallback), so the recorded batch dimension is 1.
    """
    args, kwargs = example_inputs
    try:
        return _shape_prop(gm, _one_sample(args), _one_sample(kwargs))
    except Exception:  # noqa: BLE001 - e.g. a batch-of-one squeeze: the full batch decides
        pass
    try:
        _shape_prop(gm, args, kwargs)
    except Exception as e:  # noqa: BLE001 - rerun node by node to name the failing node
        node, err = failing_node(gm, args, kwargs)
        err = err or e
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        shapes += [(k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        at = f" at node {node.name!r}" if node is not None else ""
        reason = str(err).split("\n\nWhile executing")[0]
        raise TraceError(f"the example input (shapes {shapes}) does not run through the model{at}: "
                         f"{type(err).__name__}: {reason}") from e


def _shape_prop(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    with torch.no_grad():
        _ShapeRecorder(gm).run(*bind_inputs(gm, args, kwargs))


_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """torch's ``_extract_tensor_metadata`` of a dense tensor, through the C++ contiguity checks (torch's
    goes through ``torch._check``, whose first call imports sympy)."""
    if t.layout is not torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    memory_format = next((f for f in _FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


class _ShapeRecorder(fx.Interpreter):
    """``node.meta["tensor_meta"]`` / ``["type"]`` as torch's ShapeProp records them, without its fake-tensor
    support: ShapeProp imports sympy (0.6 s, most of a small model's first quantization in a process)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def meta(value: Any) -> Any:
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _tensor_meta(value)
            return value

        tensor_meta = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)
        return result


def _one_sample(inputs):
    """The first sample of every tensor when they all share one batch size > 1 (else ``inputs``)."""
    tensors = [t for t in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes or sizes == {1}:
        return inputs
    if isinstance(inputs, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return tuple(v[:1] if isinstance(v, torch.Tensor) else v for v in inputs)
