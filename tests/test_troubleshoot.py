"""mct_fx.troubleshoot: it finds the cause planted in models built to have it, and writes JSON + HTML."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import mct_fx
from mct_fx.report import output_sqnr
from mct_fx.troubleshoot import TroubleshootConfig
from mct_fx.troubleshoot_verify import apply_change

DATA = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class ThreeConvs(nn.Module):
    def __init__(self, act=torch.relu):
        super().__init__()
        torch.manual_seed(0)
        self.act = act
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c3(self.act(self.c2(self.act(self.c1(x))))).mean((2, 3))


def _outlier_channel_model() -> nn.Module:
    """Channel 3 of c1 scaled up 60x and c2's input from it scaled down: same function, one wide channel."""
    m = ThreeConvs().eval()
    with torch.no_grad():
        m.c1.weight[3] *= 60
        m.c1.bias[3] *= 60
        m.c2.weight[:, 3] /= 60
    return m


def _findings(report, cause):
    return [f for f in report.findings if f.cause == cause]


def test_an_outlier_channel_is_found_and_equalization_fixes_it():
    model = _outlier_channel_model()
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, verbose=False)
    found = _findings(report, "outlier channel")
    assert [f.node for f in found] == ["relu"], report.summary()
    assert "channel 3" in found[0].evidence and "activation_channel_equalization=True" in found[0].knob
    assert (found[0].seen_at or found[0].node) in report.flagged
    fixed = mct_fx.quantize(model, DATA, "imx500", mct_fx.QuantConfig(activation_channel_equalization=True),
                            verbose=False)
    after = mct_fx.troubleshoot(model, fixed, DATA, verbose=False)
    assert not after.flagged and after.comparison.output["sqnr"] > report.comparison.output["sqnr"] + 6


def test_verify_measures_each_knob():
    model = _outlier_channel_model()
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, verify=True, verbose=False)
    channel = _findings(report, "outlier channel")[0]
    assert channel.change == {"activation_channel_equalization": True}
    assert channel.measured > report.verify_baseline + 6  # measured, not assumed
    # same data; the comparison's float reference is the rescaled (power-of-two aligned) graph: rounding apart
    assert report.verify_baseline == pytest.approx(report.comparison.output["sqnr"], abs=1e-3)
    assert "[tried: output SQNR" in report.summary() and "better]" in report.summary()
    assert all(f.measured is None for f in report.findings if f.change is None)


def test_a_silu_tail_without_snc_is_found_and_its_knob_is_verified():
    model = ThreeConvs(nn.functional.silu).eval()
    loose = TroubleshootConfig(sqnr_db=40)  # 8-bit SiLU loses a few dB to the tail: flag generously
    q = mct_fx.quantize(model, DATA, "imx500", mct_fx.QuantConfig(shift_negative_correction=False), verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, loose, verify=True, verbose=False)
    tails = [f for f in _findings(report, "negative tail") if f.node == "silu"]
    assert tails, report.summary()
    assert tails[0].knob.startswith("QuantConfig(shift_negative_correction=True, shift_negative_ratio=0.")
    # the knob applied shifts the grid, and the measured output SQNR is that model's (here, at 8 bits, about
    # the same as without: the shifted grid wins on this layer and loses about as much downstream)
    fixed = mct_fx.quantize(model, DATA, "imx500", apply_change(q.meta["mct_fx.config"], tails[0].change),
                            verbose=False)
    assert any(r.node == "silu" and "shifted" in r.activation for r in mct_fx.summary(fixed).layers)
    assert tails[0].measured == pytest.approx(output_sqnr(model, fixed, DATA), abs=1e-6)
    report = mct_fx.troubleshoot(model, fixed, DATA, loose, verbose=False)
    assert "silu" not in [f.node for f in _findings(report, "negative tail")], report.summary()


def test_a_two_bit_layer_is_found():
    model = ThreeConvs().eval()
    config = mct_fx.QuantConfig(overrides=(mct_fx.LayerOverride(name="c2", weights_n_bits=2),))
    q = mct_fx.quantize(model, DATA, "imx500", config, verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, verbose=False)
    low = _findings(report, "low bit-width")
    assert [(f.node, f.evidence.split()[0]) for f in low] == [("c2", "2-bit")], report.summary()
    assert "weights_n_bits=8" in low[0].knob


def test_clipping_of_a_tail_that_matters_is_found_and_its_knob_helps():
    class Linear3(ThreeConvs):
        def forward(self, x):
            return self.c3(self.c2(torch.relu(self.c1(x)))).mean((2, 3))

    model = Linear3().eval()
    g = torch.Generator().manual_seed(1)
    spiky = torch.where(torch.rand(DATA.shape, generator=g) < 0.002, DATA * 40, DATA)  # rare large inputs
    q = mct_fx.quantize(model, spiky, "imx500", verbose=False)  # z_threshold=16 drops the spikes from the search
    report = mct_fx.troubleshoot(model, q, spiky, verbose=False)
    clipping = _findings(report, "clipping")
    assert "x" in [f.node for f in clipping], report.summary()
    assert clipping[0].knob.startswith("QuantConfig(z_threshold=math.inf)")
    fixed = mct_fx.quantize(model, spiky, "imx500", mct_fx.QuantConfig(z_threshold=math.inf), verbose=False)
    after = mct_fx.troubleshoot(model, fixed, spiky, verbose=False)
    assert after.comparison.output["sqnr"] > report.comparison.output["sqnr"] + 6
    assert not _findings(after, "outliers")  # no advice to clip the tail again: it would lose more than it gains


def test_a_two_bit_layer_chosen_by_mixed_precision_names_the_budget():
    model = ThreeConvs().eval()
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))  # float32 bytes / 4
    budget = mct_fx.ResourceUtilization(weights_memory=0.5 * weights)  # 4 bits per weight on average
    q = mct_fx.quantize(model, DATA, "imx500", target=budget, verbose=False)
    two_bit = [n for n, b in mct_fx.summary(q).mixed_precision.bits.items() if b == "W2"]
    assert two_bit
    report = mct_fx.troubleshoot(model, q, DATA, verbose=False)
    low = {f.node: f for f in _findings(report, "low bit-width")}
    assert set(two_bit) <= set(low), report.summary()
    assert "mixed precision chose W2" in low[two_bit[0]].evidence
    assert low[two_bit[0]].knob.startswith("raise the ResourceUtilization budget")


def test_unbalanced_concat_and_unknown_op_are_found():
    class CatNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.c = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
            return torch.cumsum(self.c(y), 1).mean((2, 3))

    model = CatNet().eval()
    with torch.no_grad():
        model.b.weight *= 50
        model.b.bias *= 50
        model.c.weight[:, 8:] /= 50
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, verbose=False)
    concat = _findings(report, "unbalanced concat")
    assert [f.node for f in concat] == ["cat"], report.summary()
    assert int(re.search(r"\((\d+)x\)", concat[0].evidence).group(1)) >= 30  # the planted 50x, give or take
    assert [f.node for f in _findings(report, "unknown op")] == ["cumsum"]


def test_a_healthy_model_flags_nothing_and_the_report_files_are_written(tmp_path, capsys):
    model = ThreeConvs().eval()
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, validation=DATA[:32], out_dir=tmp_path)
    assert report.flagged == () and report.findings == ()
    assert "0 of" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["flagged"] == [] and data["comparison"]["layers"][0]["validation"] is not None
    page = (tmp_path / "report.html").read_text()
    assert "<table id='layers'>" in page and page.count("data:image/png;base64,") == 1


def test_report_json_and_html_on_a_degraded_model(tmp_path):
    model = _outlier_channel_model()
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, out_dir=tmp_path, verbose=False)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["flagged"] == list(report.flagged)
    assert {f["cause"] for f in data["findings"]} >= {"outlier channel"}
    page = (tmp_path / "report.html").read_text()
    assert "<table id='findings'>" in page and "outlier channel" in page
    assert page.count("data:image/png;base64,") == 1 + len({*report.flagged, "relu"})  # SQNR bars + per layer


def test_bad_thresholds_are_named():
    with pytest.raises(ValueError, match="negative_tail_ratio"):
        TroubleshootConfig(negative_tail_ratio=1.5)
    with pytest.raises(ValueError, match="low_bits"):
        TroubleshootConfig(low_bits=1)


def test_cli_report_writes_json_and_html(tmp_path):
    from mct_fx.cli import main

    assert main(["report", "--model", "demo", "--calib", "random", "--n-calib", "64", "--out", str(tmp_path),
                 "--quiet", "--sqnr-db", "60"]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["flagged"] and (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian package chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    model = _outlier_channel_model()
    q = mct_fx.quantize(model, DATA, "imx500", verbose=False)
    report = mct_fx.troubleshoot(model, q, DATA, out_dir=tmp_path, verbose=False)
    html_path = tmp_path / "report.html"
    # the DOM after layout: every image decoded (naturalWidth > 0), both tables present
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const rows = (id) => document.querySelectorAll(id + ' tr').length;
  document.title = JSON.stringify({images: imgs.length, decoded: imgs.filter(i => i.naturalWidth > 0).length,
    findings: rows('#findings'), inherited: rows('#inherited'), layers: rows('#layers')});
});</script></body>"""))
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    title = json.loads(dom.split("<title>")[1].split("</title>")[0].replace("&quot;", '"'))
    assert title["images"] >= 2 and title["decoded"] == title["images"]
    inherited = sum(f.cause == "inherited" for f in report.findings)
    assert title["findings"] == len(report.findings) - inherited + 1  # causes, header included
    assert title["inherited"] == (inherited + 1 if inherited else 0)  # folded away
    assert title["layers"] == len(report.comparison.layers) + 1
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1300,1800", f"file://{html_path}"],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 1800)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # not a blank page: text, table borders, plot colors
    reds = sum(n for n, (r, g, b) in colors if r > 180 and g < 80 and b < 80)
    assert reds > 500  # the flagged bars of the SQNR plot are drawn
