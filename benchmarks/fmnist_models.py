"""The two Fashion-MNIST benchmark models (plain torch, importable from any peer's venv).

* ``FmnistResNet``: a ResNet-style CNN (BatchNorm, ReLU, residual adds, a 1x1 shortcut);
* ``FmnistMobileNet``: a MobileNetV2-style CNN (inverted residuals with depthwise convs,
  ReLU6, SiLU and Hardswish).

Inputs are ``[N, 1, 28, 28]`` images in ``[0, 1]``; outputs 10 logits.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FmnistResNet", "FmnistMobileNet", "MODELS"]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class FmnistResNet(nn.Sequential):
    def __init__(self):
        super().__init__(*conv_bn(1, 16), nn.ReLU(), *conv_bn(16, 32, 3, 2), nn.ReLU(), BasicBlock(32, 32),
                         BasicBlock(32, 64, 2), BasicBlock(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type[nn.Module] = nn.ReLU6):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(*conv_bn(cin, mid, 1), act(), *conv_bn(mid, mid, 3, stride, groups=mid), act(),
                                  *conv_bn(mid, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class FmnistMobileNet(nn.Sequential):
    def __init__(self):
        super().__init__(*conv_bn(1, 24), nn.ReLU6(), *conv_bn(24, 32, 3, 2), nn.ReLU6(),
                         InvertedResidual(32, 32, 1, 3), InvertedResidual(32, 32, 1, 3, nn.SiLU),
                         InvertedResidual(32, 48, 2, 3), InvertedResidual(48, 48, 1, 4),
                         InvertedResidual(48, 48, 1, 4, nn.SiLU), *conv_bn(48, 128, 1), nn.Hardswish(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))


MODELS = {"fmnist_resnet": FmnistResNet, "fmnist_mobilenet": FmnistMobileNet}
