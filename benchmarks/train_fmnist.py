"""Train the Fashion-MNIST benchmark models, seeded, and cache them.

    python benchmarks/train_fmnist.py [--only fmnist_resnet] [--force]

Writes ``<cache>/fmnist_resnet.pt`` and ``<cache>/fmnist_mobilenet.pt`` (state_dict
plus float test accuracy); the cache is ``$MCT_FX_BENCH_CACHE`` or
``~/.cache/mct_fx/benchmarks``.  About 4-5 minutes per model on 2 CPU cores.
Needs ``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from fmnist_models import MODELS
from torch import nn

import assets

EPOCHS = {"fmnist_resnet": 4, "fmnist_mobilenet": 5}
CACHE = os.environ.get("MCT_FX_BENCH_CACHE", os.path.expanduser("~/.cache/mct_fx/benchmarks"))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (batches of 1000)."""
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float(pred.eq(y).float().mean()) * 100


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels."""
    x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x, x.flip(-1))
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    i, j = torch.randint(0, 5, (2,)).tolist()
    return padded[..., i:i + 28, j:j + 28]


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One epoch of augmented batches of 128 with label smoothing 0.05; leaves the model in eval mode."""
    model.train()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        idx = perm[i:i + 128]
        loss = nn.functional.cross_entropy(model(augment(x[idx])), y[idx], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
          log=print, test: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """AdamW + one-cycle schedule + label smoothing, batches of 128; returns the model in eval mode."""
    torch.manual_seed(seed)
    steps = epochs * ((len(x) + 127) // 128)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    start = time.time()
    for epoch in range(epochs):
        train_epoch(model, x, y, opt, sched)
        note = f", test accuracy {accuracy(model, *test):.2f}%" if test is not None else ""
        log(f"epoch {epoch + 1}/{epochs}{note} ({time.time() - start:.0f} s)")
    return model.eval()


def path_of(name: str) -> str:
    return os.path.join(CACHE, f"{name}.pt")


def load(name: str) -> tuple[nn.Module, float]:
    """A cached trained model and its float test accuracy (trains it first when missing)."""
    if not os.path.exists(path_of(name)):
        build(name)
    saved = torch.load(path_of(name), weights_only=True)
    model = MODELS[name]()
    model.load_state_dict(saved["state_dict"])
    return model.eval(), float(saved["test_accuracy"])


def build(name: str) -> float:
    x, y = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    torch.manual_seed(0)
    model = train(MODELS[name](), x, y, EPOCHS[name], test=(xt, yt), log=lambda m: print(f"{name}: {m}"))
    acc = accuracy(model, xt, yt)
    os.makedirs(CACHE, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "test_accuracy": acc}, path_of(name))
    print(f"{name}: float test accuracy {acc:.2f}% -> {path_of(name)}")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args = parser.parse_args()
    for name in [args.only] if args.only else list(MODELS):
        if args.force or not os.path.exists(path_of(name)):
            build(name)
        else:
            print(f"{name}: cached at {path_of(name)} ({load(name)[1]:.2f}%)")


if __name__ == "__main__":
    main()
