"""Structured pruning: channel sections, the pruning pass, SIMD groups, the weights budget."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import mct_fx
from mct_fx.channel_sections import find_sections, keep_index, weight_axes
from mct_fx.graph_utils import attr_value
from mct_fx.hessian import HessianConfig
from mct_fx.passes.functionalize import functionalize_layers
from mct_fx.passes.prune_channels import prune_channels
from mct_fx.pruning import PruningConfig, prune
from mct_fx.resources import ResourceUtilization, float_weights_memory
from mct_fx.trace import trace

FAST_HESSIAN = HessianConfig(max_iterations=4, min_iterations=2)


class Mixed(nn.Module):
    """Ops the torchvision models do not cover: transposed conv, PReLU, a concat with the input,
    a flatten over spatial positions into a linear layer, a view on the batch size."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 16, 2, stride=2)
        self.act = nn.PReLU(16)
        self.conv = nn.Conv2d(19, 24, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.down = nn.ConvTranspose2d(24, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = self.act(self.up(x))
        y = torch.relu(self.bn(self.conv(torch.cat([y, torch.nn.functional.interpolate(x, scale_factor=2.0)], 1))))
        z = torch.nn.functional.adaptive_avg_pool2d(self.down(y), 4)
        return self.fc(z.flatten(1)).view(z.size(0), -1)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = Mixed() if name == "mixed" else getattr(torchvision.models, name)(num_classes=10)
    for m in model.modules():  # random running statistics so BatchNorm is not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _graph(model: nn.Module, x: torch.Tensor):
    gm = trace(model, ((x,), {}))
    functionalize_layers(gm)
    return gm


def _random_keep(sections, gen):
    keep = {}
    for s in sections.prunable:
        blocks = s.channels // s.block
        chosen = torch.randperm(blocks, generator=gen)[:int(torch.randint(1, blocks, (1,), generator=gen))]
        keep[s.index] = (chosen[:, None] * s.block + torch.arange(s.block)).flatten().sort().values
    return keep


MODELS = ["resnet18", "mobilenet_v2", "densenet121", "regnet_x_400mf", "regnet_y_400mf", "mixed"]


@pytest.mark.parametrize("name", MODELS)
def test_pruned_graph_equals_the_original_with_the_removed_inputs_zeroed(name):
    """Removing channels = zeroing what they feed into every exit: the pass drops exactly those channels,
    consistently across every coupled layer (residual adds, concats, grouped and depthwise convs)."""
    x = torch.randn(2, 3, 32, 32) if name != "mixed" else torch.randn(2, 3, 2, 2)
    gm = _graph(_model(name), x)
    sections = find_sections(gm)
    assert sections.prunable
    keep = _random_keep(sections, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(gm)
    nodes = {n.name: n for n in reference.graph.nodes}
    for exit_name, segs in sections.exits.items():
        w = attr_value(reference, nodes[exit_name].args[1])
        axis = weight_axes(nodes[exit_name])[1]
        mask = torch.zeros(w.shape[axis])
        mask[keep_index(segs, keep)] = 1
        with torch.no_grad():
            w.mul_(mask.view([-1 if d == axis else 1 for d in range(w.dim())]))
    pruned = prune_channels(copy.deepcopy(gm), sections, keep)
    n_before = sum(p.numel() for p in gm.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_before
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), rtol=1e-4, atol=1e-4)


def test_sections_follow_residuals_concats_and_groups():
    gm = _graph(_model("resnet18"), torch.randn(1, 3, 32, 32))
    sections = find_sections(gm)
    stage1 = sections.sections[sections.entries["layer1_0_conv2"]]
    assert set(stage1.entries) == {"layer1_0_conv2", "layer1_1_conv2"} | {"conv1"}  # the stem feeds the stream
    stage2 = sections.sections[sections.entries["layer2_0_conv2"]]
    assert set(stage2.entries) == {"layer2_0_conv2", "layer2_0_downsample_0", "layer2_1_conv2"}
    assert sections.sections[sections.entries["fc"]].frozen == "reaches the model output"
    assert [s.repeat for s in sections.exits["fc"]] == [1]  # 1x1 after the pooling

    gm = _graph(_model("regnet_x_400mf"), torch.randn(1, 3, 32, 32))
    sections = find_sections(gm)
    grouped = sections.sections[sections.entries["trunk_output_block2_block2_0_f_a_0"]]
    assert grouped.block == 16 and grouped.frozen is None  # whole groups of the grouped 3x3 conv

    gm = _graph(_model("densenet121"), torch.randn(1, 3, 32, 32))
    sections = find_sections(gm)
    # the second dense layer's 1x1 conv reads the block input and the first layer's new channels
    segs = sections.exits["features_denseblock1_denselayer2_conv1"]
    assert [s.size for s in segs] == [64, 32]
    assert segs[1].section == sections.entries["features_denseblock1_denselayer1_conv2"]


def test_a_target_at_the_current_size_changes_nothing():
    model = _model("resnet18")
    x = torch.randn(4, 3, 32, 32)
    full = float_weights_memory(model)
    pruned, info = prune(model, [x], ResourceUtilization(weights_memory=full))
    assert info.weights_memory_after == info.weights_memory_before == full
    assert all(len(layer.kept) == attr_value(pruned, n.args[1]).shape[0]
               for n in pruned.graph.nodes if (layer := info.layers.get(n.name)))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,importance", [("resnet18", "lfh"), ("mobilenet_v2", "lfh"),
                                             ("densenet121", "l2"), ("regnet_x_400mf", "l1"),
                                             ("regnet_y_400mf", "lfh")])
def test_pruning_meets_the_target_in_simd_groups(name, importance):
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 3, 32, 32)
    full = float_weights_memory(model)
    target = ResourceUtilization(weights_memory=0.6 * full)
    pruned, info = prune(model, [x[:4], x[4:]], target, config=PruningConfig(importance=importance, n_images=8,
                                                                             hessian=FAST_HESSIAN))
    actual = 4 * sum(p.numel() for p in pruned.parameters())
    assert actual == info.weights_memory_after <= target.weights_memory
    assert actual > 0.5 * full  # the budget is used, not overshot downwards
    nodes = {n.name: n for n in pruned.graph.nodes}
    pruned_sections = 0
    for s in info.sections:
        assert s.kept == s.channels or (s.frozen is None and s.kept % s.simd == 0 and s.kept > 0), s
        pruned_sections += s.kept < s.channels
        for entry in s.entries:
            node = nodes[entry]
            assert attr_value(pruned, node.args[1]).shape[weight_axes(node)[0]] == s.kept
            assert len(info.layers[entry].kept) == s.kept
    assert pruned_sections >= 1
    assert all(s.simd % 32 == 0 for s in info.sections if s.frozen is None)  # imx500: SIMD 32
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched


def test_removed_channels_score_no_higher_than_kept_ones():
    model = _model("mobilenet_v2")
    x = torch.randn(8, 3, 32, 32)
    _, info = prune(model, [x], ResourceUtilization(weights_memory=0.5 * float_weights_memory(model)),
                    config=PruningConfig(n_images=8, hessian=FAST_HESSIAN))
    checked = 0
    for layer in info.layers.values():
        if layer.importance and len(layer.kept) < len(layer.importance):
            scores = torch.tensor(layer.importance)
            kept = torch.zeros(len(scores), dtype=torch.bool)
            kept[list(layer.kept)] = True
            assert scores[~kept].max() <= scores[kept].min()
            checked += 1
    assert checked >= 5


def test_mean_compensation_keeps_the_exit_means():
    """The mean of what a removed channel fed an exit moves into the exit's bias / the next BN's mean."""
    model = _model("mobilenet_v2")
    x = torch.randn(16, 3, 32, 32)
    target = ResourceUtilization(weights_memory=0.5 * float_weights_memory(model))
    config = PruningConfig(importance="l1", n_images=16)
    pruned, _ = prune(model, [x], target, config=config)
    with torch.no_grad():
        ref = model(x)
        err = (pruned(x) - ref).pow(2).mean()
        gm = _graph(model, x)
        sections = find_sections(gm)
        keep = {}
        for name, layer in pruned.meta["mct_fx.pruning"].layers.items():
            keep.setdefault(sections.entries[name], torch.tensor(layer.kept))
        keep = {k: v for k, v in keep.items() if len(v) < sections.sections[k].channels}
        plain_err = (prune_channels(gm, sections, keep)(x) - ref).pow(2).mean()
    assert err < plain_err


def test_prune_then_quantize_then_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model("mobilenet_v2")
    x = torch.randn(8, 3, 32, 32)
    pruned, _ = prune(model, [x], ResourceUtilization(weights_memory=0.5 * float_weights_memory(model)),
                      config=PruningConfig(n_images=8, hessian=FAST_HESSIAN))
    qmodel = mct_fx.quantize(pruned, [x], verbose=False)
    path = tmp_path / "pruned.onnx"
    mct_fx.export_onnx(qmodel, x[:1], str(path))
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]
    with torch.no_grad():
        assert out.shape == tuple(qmodel(x[:1]).shape)


def test_bad_targets_fail_early():
    model = _model("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="weights_memory"):
        prune(model, [x], ResourceUtilization(activation_memory=10.0))
    with pytest.raises(TypeError, match="ResourceUtilization"):
        prune(model, [x], 1000)
    with pytest.raises(ValueError, match="smallest model"):
        prune(model, [x], ResourceUtilization(weights_memory=1000.0), config=PruningConfig(importance="l1"))
    with pytest.raises(ValueError, match="n_images"):
        PruningConfig(n_images=0)
    with pytest.raises(ValueError):
        PruningConfig(importance="random")


@pytest.mark.slow
def test_fine_tuning_recovers_a_pruned_fashion_mnist_model():
    """The documented recipe (benchmarks/pruning.py ``fine_tune``): one epoch on 10k images brings a model
    pruned to half its weights back near its float accuracy."""
    import train_fmnist
    from pruning import fine_tune

    import assets

    if not assets.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    model, _ = train_fmnist.load("fmnist_mobilenet")
    x, y = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    calib = list(x[pick[:32]].split(16))
    target = ResourceUtilization(weights_memory=0.5 * float_weights_memory(model))
    pruned, info = prune(model, calib, target)
    assert info.weights_memory_after <= target.weights_memory
    float_acc = train_fmnist.accuracy(model, xt, yt)
    pruned_acc = train_fmnist.accuracy(pruned, xt, yt)
    tuned = fine_tune(pruned, x[pick[32:10032]], y[pick[32:10032]], epochs=1)
    tuned_acc = train_fmnist.accuracy(tuned, xt, yt)
    assert tuned_acc > pruned_acc + 10 and tuned_acc > float_acc - 6, (float_acc, pruned_acc, tuned_acc)
