"""Layout rewrites of the IMX500 export: tensors above 4-D lowered (``lower_rank``), the readers of a fully
connected layer on a 1x1 map reordered (``order_fc_readers``); both keep the function, checked on values, and
the second is checked against the real converter, whose failure it avoids."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import mct_fx
from mct_fx.export_check import ExportError
from mct_fx.passes.lower_rank import MAX_RANK, lower_rank, merged_permutation
from mct_fx.passes.order_fc_readers import order_fc_readers
from mct_fx.trace import trace


def _ranks(gm: fx.GraphModule) -> list[int]:
    return [len(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if hasattr(n.meta.get("tensor_meta"), "shape")]


# ------------------------------------------------------------------ merged_permutation


@pytest.mark.parametrize("shape, perm, expected", [
    ((1, 6, 4, 10, 10), (0, 3, 4, 1, 2), ((1, 24, 100), (0, 2, 1))),  # torchvision's SSD head
    ((1, 6, 4, 1, 1), (0, 3, 4, 1, 2), ((1, 24), (0, 1))),            # its 1x1 maps: only unit dims move
    ((2, 3, 4, 5, 6), (0, 1, 2, 3, 4), ((2, 360), (0, 1))),
    ((2, 3, 4, 5, 6), (0, 2, 4, 1, 3), ((2, 3, 4, 5, 6), (0, 2, 4, 1, 3))),  # nothing adjacent: stays 5-D
    ((4, 3, 5), (1, 0, 2), ((4, 3, 5), (1, 0, 2))),                   # the batch is never merged
])
def test_merged_permutation(shape, perm, expected):
    assert merged_permutation(shape, perm) == expected


# ------------------------------------------------------------------ lower_rank


class _Rows(nn.Module):
    """Conv output reordered into rows through a 5-D view, as detection heads do."""

    def __init__(self, view: tuple[int, ...], perm: tuple[int, ...], channels: int):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1)
        self.view, self.perm = view, perm

    def forward(self, x):
        y = self.conv(x)
        return y.view(x.shape[0], *self.view).permute(*self.perm).reshape(x.shape[0], -1)


def _lowered(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    gm = trace(model)
    return gm, lower_rank(gm, (x,))


def test_ssd_head_rows_are_lowered_to_4d_with_the_same_values():
    x = torch.randn(2, 3, 10, 10)
    model = _Rows((6, 4, 10, 10), (0, 3, 4, 1, 2), 24).eval()
    gm, rewritten = _lowered(model, x)
    assert rewritten and max(_ranks(gm)) <= MAX_RANK
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=4, max_size=4), st.permutations(range(4)))
def test_any_5d_permute_keeps_its_values(sizes, perm):
    """Rewritten or not, the graph computes the same tensor; when rewritten, nothing is above 4-D."""
    a, b, h, w = sizes
    x = torch.randn(2, 3, h, w)
    model = _Rows((a, b, h, w), (0, *(p + 1 for p in perm)), a * b).eval()
    gm, rewritten = _lowered(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert bool(rewritten) == (max(_ranks(gm)) <= MAX_RANK)


def test_a_5d_tensor_the_pass_cannot_lower_fails_the_export_naming_it(tmp_path):
    torch.manual_seed(0)
    model = _Rows((2, 3, 4, 5), (0, 2, 4, 1, 3), 6).eval()  # no two source dims stay adjacent
    calib = [torch.rand(4, 3, 4, 5) for _ in range(2)]
    qmodel = mct_fx.quantize(model, calib, "imx500", verbose=False)
    with pytest.raises(ExportError, match=r"'(view|permute)\w*' makes a 5-D tensor .*at most 4-D"):
        mct_fx.export_imx500(qmodel, calib[0][:1], tmp_path / "rows.onnx")
    assert not (tmp_path / "rows.onnx").exists()


def test_dead_code_left_by_the_rewrite_is_dropped_with_its_modules():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows, self.unused = _Rows((6, 4, 4, 4), (0, 3, 4, 1, 2), 24), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.rows(x), self.unused(x).view(x.shape[0], 3, 1, 4, 4).permute(0, 3, 4, 1, 2).sum()

    x = torch.randn(1, 3, 4, 4)
    gm = trace(Two().eval())
    gm.graph.output_node().args = (gm.graph.output_node().args[0][0],)  # the second output's chain is now dead
    lower_rank(gm, (x,))
    assert not hasattr(gm, "unused")


# ------------------------------------------------------------------ order_fc_readers


class _FanOut(nn.Module):
    """A 1x1 map made by a 1x1 convolution and read first by another (fully connected to the converter),
    then by a depthwise 3x3 convolution: the SSD extra layer feeding both the next one and the head."""

    def __init__(self, depends: bool = False):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, 16, 1), nn.ReLU())        # 16x16 -> 1x1
        self.fc = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU6())
        self.next = nn.Sequential(nn.Conv2d(32, 8, 1), nn.ReLU6())
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.ReLU6())
        self.depends = depends

    def forward(self, x):
        h = self.fc(self.down(x))
        a = self.next(h)
        b = self.head(h + a.mean() if self.depends else h)
        return a, b


def _readers(gm: fx.GraphModule, name: str) -> list[str]:
    node = next(n for n in gm.graph.nodes if n.name == name)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [u.name for u in sorted(node.users, key=order.__getitem__)]


def _quantized_fan_out(depends: bool = False) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    calib = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    return mct_fx.quantize(_FanOut(depends).eval(), calib, "imx500", verbose=False), calib


def test_a_non_fc_reader_is_moved_first_and_the_values_stay():
    qmodel, calib = _quantized_fan_out()
    gm = copy.deepcopy(qmodel)
    lower_rank(gm, (calib[0][:1],))  # shapes
    source = "fc_1_act_quant"
    assert _readers(gm, source)[0].startswith("next")
    assert order_fc_readers(gm) == ["head_0"]
    assert _readers(gm, source)[0] == "head_0"
    for x in calib:
        for got, want in zip(gm(x), qmodel(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_reader_that_needs_the_first_readers_result_stays():
    qmodel, calib = _quantized_fan_out(depends=True)
    lower_rank(qmodel, (calib[0][:1],))
    assert order_fc_readers(qmodel) == []


def test_the_fan_out_converts_only_with_the_readers_reordered(tmp_path, monkeypatch):
    """imxconv-pt 3.19.2 fails on the model as written (this is what the rewrite is for) and converts it
    with the depthwise reader first."""
    from test_export_imx500 import _converter_or_skip

    converter = _converter_or_skip()
    qmodel, calib = _quantized_fan_out()
    exported = mct_fx.export_imx500(qmodel, calib[0][:1], tmp_path / "fan_out.onnx")
    package = mct_fx.convert_imx500(exported.path, tmp_path / "imx500", converter)
    assert package.memory.fits
    monkeypatch.setattr(sys.modules["mct_fx.export_imx500"], "order_fc_readers", lambda gm: [])
    as_written = mct_fx.export_imx500(qmodel, calib[0][:1], tmp_path / "as_written.onnx")
    with pytest.raises(mct_fx.ConversionError, match="should be 3 or 4 dimensions for tensor reshape"):
        mct_fx.convert_imx500(as_written.path, tmp_path / "imx500_as_written", converter)
