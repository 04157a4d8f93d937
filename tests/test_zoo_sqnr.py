"""W8A8 output SQNR on the torchvision zoo, against Sony MCT's PTQ on the same models and inputs.

Models: random weights (seeds 0-2), BatchNorm statistics re-estimated, 64x64
inputs (``benchmarks/zoo.py``).  MCT 2.6.1 (``model-compression-toolkit``,
``mct.ptq.pytorch_post_training_quantization``, ``tpc_version="1.0"``,
``device_type="imx500"``, default core config), measured once in a scratch venv with
``python benchmarks/zoo_sqnr.py --mct-python <mct venv>/bin/python`` on
2026-11-27; its values are recorded below.

These random-weight networks are chaotic: moving every weight scale of one
quantized model by 0.1-0.3% moves its SQNR by 0.1-0.25 dB (std; up to 0.76 dB),
so two equally good quantizers differ by that much per seed.  The test
compares means over three seeds and allows that noise (``NOISE_DB``); the
benchmark prints the full table.  Both tools also move between machines: on the
machine of 2026-11-28 MCT's densenet121 gave 14.19 / 13.59 / 13.06 dB for seeds
0-2 (recorded below: 14.04 / 13.58 / 13.05), and over seeds 0-5 the two tools'
densenet121 means were 13.43 (mct_fx) and 13.44 dB (MCT); over seeds 6-15 13.29 and
13.40 (per-seed differences -0.54 to +0.20 dB); over seeds 16-31 13.19 and 13.16
(-0.27 to +0.42 dB; 2026-11-28).  All 32 seeds: mean difference -0.02 dB, standard
error 0.04 dB: a tie.  On seed 0 (power-of-two alignment
off, so both tools see the same tensors; MCT's activation thresholds put in ours: 13.87 dB)
replacing our quantized kernels by MCT's, which have the same squared error from the
float kernels within 0.3 % per layer but sit on per-channel scales 0.1 % apart, gives
14.10 dB, and MCT's biases as well 14.19 dB (MCT's own number): at this SQNR the
result is set by chaos more than by the quantizers.
"""

import statistics

import pytest
import torch

import mct_fx

import zoo

SEEDS = (0, 1, 2)
NOISE_DB = 0.3
# per seed 0, 1, 2; None: MCT cannot quantize the model
MCT_SQNR_DB = {
    "resnet18": (21.62, 22.07, 21.39),
    "mobilenet_v2": (5.73, 5.06, 5.88),
    "efficientnet_b0": (4.47, 2.98, 3.04),
    "regnet_y_400mf": (7.88, 7.31, 7.55),
    "shufflenet_v2_x1_0": (6.29, 7.03, 6.87),
    "densenet121": (14.04, 13.58, 13.05),
    "convnext_tiny": (27.41, 27.25, 27.38),
    # MCT 2.6.1 raises AttributeError in its graph builder (nn.MultiheadAttention output shapes)
    "vit_b_16": None,
}


def _sqnr(name: str, seed: int) -> float:
    model, side = zoo.build(name, seed)
    calib, x = zoo.calibration(side), zoo.evaluation(side)
    q = mct_fx.quantize(model, calib, "imx500", verbose=False)
    with torch.no_grad():
        return zoo.sqnr_db(model(x), q(x))


@pytest.mark.parametrize("name", list(MCT_SQNR_DB))
def test_w8a8_sqnr_at_least_mct(name):
    ours = statistics.mean(_sqnr(name, seed) for seed in SEEDS)
    reference = MCT_SQNR_DB[name]
    if reference is None:
        assert ours > 8.0  # MCT has no number here; ours must still be a working W8A8 model
        return
    mct = statistics.mean(reference)
    assert ours >= mct - NOISE_DB, f"{name}: {ours:.2f} dB vs MCT {mct:.2f} dB"
