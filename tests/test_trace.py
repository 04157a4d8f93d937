"""Tracing front-end: the torchvision zoo, clear errors and their escape hatches."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import regnet

import mct_fx
from mct_fx import TraceError

ZOO = torchvision.models.list_models(module=torchvision.models)


@pytest.fixture
def regnet_on_meta(monkeypatch):
    """RegNet builders compute widths with tensor ops that cannot run on the meta device."""
    original = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(regnet.BlockParams, "from_init_params", classmethod(on_cpu))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_traces_with_shapes(name, regnet_on_meta):
    # meta device: no memory, no compute; tracing and shape propagation still run in full
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    side = 299 if name == "inception_v3" else 224
    gm = mct_fx.trace(model, ((torch.empty(1, 3, side, side, device="meta"),), {}))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert tuple(output.args[0].meta["tensor_meta"].shape) == (1, 1000)
    assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d | nn.Linear)
               for n in gm.graph.nodes)


def test_zoo_size():
    assert len(ZOO) >= 80  # the walk above covers every classification model torchvision ships


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x, double=True):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(TraceError) as e:
        mct_fx.trace(Gated())
    msg = str(e.value)
    assert "'gate' (Gate)" in msg
    assert "if x.sum() > 0:" in msg and "test_trace.py" in msg
    assert "leaf_modules=['gate']" in msg and "concrete_args" in msg


def test_leaf_modules_escape_hatch():
    x = torch.randn(2, 3, 8, 8)
    for leaf in (["gate"], [Gate]):
        gm = mct_fx.trace(Gated(), ((x,), {}), leaf_modules=leaf)
        assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    q = mct_fx.quantize(Gated(), [x], "imx500", leaf_modules=["gate"], verbose=False)
    assert q(x).shape == (2, 8, 6, 6)
    with pytest.raises(TraceError, match="no submodule named 'nope'"):
        mct_fx.trace(Gated(), leaf_modules=["nope"])


def test_concrete_args_escape_hatch():
    model, x = Flagged().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match="concrete_args"):
        mct_fx.trace(model)
    gm = mct_fx.trace(model, ((x,), {}), concrete_args={"double": False})
    assert torch.equal(gm(x), model(x, double=False))  # the specialised argument is gone from the signature
    q = mct_fx.quantize(model, [x], "noquant", concrete_args={"double": False}, verbose=False)
    assert torch.allclose(q(x), model(x, double=False), atol=1e-5)


def test_trace_copies_unless_inplace():
    model = Gated()
    model.train()
    gm = mct_fx.trace(model, leaf_modules=["gate"])
    assert model.training and not gm.training
    assert gm.get_submodule("conv") is not model.conv
    gm2 = mct_fx.trace(model, leaf_modules=["gate"], inplace=True)
    assert gm2.get_submodule("conv") is model.conv


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.permute(0, 2, 3, 1), (y.flatten(1).int(), y.shape[1])


@pytest.mark.parametrize("case", ["resnet18", "channels_last", "tuples"])
def test_shapes_recorded_as_torchs_shape_prop(case):
    """trace records tensor_meta without torch's ShapeProp (which imports sympy); the metadata is the same."""
    from torch.fx.passes.shape_prop import ShapeProp

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = torchvision.models.resnet18() if case == "resnet18" else TwoOutputs()
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    gm = mct_fx.trace(model.eval(), ((x,), {}))
    ours = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    with torch.no_grad():
        ShapeProp(gm).propagate(x[:1])  # trace records shapes from one sample
    theirs = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    assert ours == theirs
    assert sum(meta is not None for meta, _ in ours.values()) >= 4


class Pieces(nn.Module):
    """YOLOv8's C2f pattern: the chunks of a conv's output kept in a list that grows."""

    def __init__(self, how: str, chunks: int = 2):
        super().__init__()
        self.how, self.chunks = how, chunks
        self.cv1, self.m, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = self.cv1(x)
        parts = list(y.chunk(self.chunks, 1)) if self.how == "chunk" else list(torch.split(y, [4, 4], 1))
        parts.append(self.m(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_unpacked_chunks_trace(how):
    model, x = Pieces(how).eval(), torch.randn(2, 3, 8, 8)
    gm = mct_fx.trace(model, ((x,), {}))
    assert torch.equal(gm(x), model(x))
    q = mct_fx.quantize(model, [x], "imx500", verbose=False)
    assert q(x).shape == (2, 8, 8, 8)


def test_a_chunk_count_the_tensor_cannot_give_names_the_node():
    model = Pieces("chunk", chunks=16).eval()  # 8 channels give 8 pieces, not 16
    with pytest.raises(TraceError, match="at node 'getitem_8'"):
        mct_fx.trace(model, ((torch.randn(2, 3, 8, 8),), {}))
