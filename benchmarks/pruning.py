"""Structured pruning side by side: mct_fx.prune vs MCT's pytorch_pruning_experimental, Fashion-MNIST models.

    python benchmarks/pruning.py --mct-python /path/to/mct-venv/bin/python [--fractions 0.5,0.75]

Both tools prune the same trained model to a fraction of its float32 weights
memory, scoring channels on the same 32 calibration images (both default to LFH
and imx500's SIMD width 32).  Each run is a fresh worker process (wall time and
peak RSS are its own).  The pruned model is evaluated on the 10k test images as
it is and after a short fine-tune with one recipe for both (``fine_tune``:
AdamW 1e-3 with a cosine decay, label smoothing 0.05, flips and 2-pixel shifts,
batches of 128, ``--ft-images`` training images, ``--ft-epochs`` epochs).

Budget accounting differs: mct_fx counts parameters, MCT also counts BatchNorm's
running statistics.  Each tool is given ``fraction x`` the model's size in its
own accounting (what its user would type); the table reports the parameters each
pruned model really has.  Tables go to stdout and ``benchmarks/results/pruning.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compare import _build, _fmnist_job, _mct_gen, _mct_tpc, _peak_rss_mb  # noqa: E402

TOOLS = ("mct_fx", "MCT")
N_SCORE_IMAGES = 32


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """The recipe for a pruned model: AdamW 1e-3, cosine decay, label smoothing, light augmentation."""
    from train_fmnist import train_epoch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 127) // 128))
    for _ in range(epochs):
        train_epoch(model, x, y, opt, sched)
    return model.eval()


def _prune(tool: str, model: nn.Module, calib: torch.Tensor, fraction: float) -> nn.Module:
    batches = list(calib[:N_SCORE_IMAGES].split(16))
    if tool == "mct_fx":
        import mct_fx
        from mct_fx.resources import float_weights_memory

        target = mct_fx.ResourceUtilization(weights_memory=fraction * float_weights_memory(model))
        pruned, _ = mct_fx.prune(model, batches, target, "imx500")
        return pruned
    import model_compression_toolkit as mct

    own = 4 * (sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")))
    ru = mct.core.ResourceUtilization(weights_memory=fraction * own)
    config = mct.pruning.PruningConfig(num_score_approximations=N_SCORE_IMAGES)
    pruned, _ = mct.pruning.pytorch_pruning_experimental(model, ru, _mct_gen(calib[:N_SCORE_IMAGES]),
                                                        pruning_config=config,
                                                        target_platform_capabilities=_mct_tpc())
    return pruned


def worker(tool: str, job_path: str, out_path: str) -> None:
    from train_fmnist import accuracy

    torch.manual_seed(0)
    job = torch.load(job_path, weights_only=False)
    model = _build(job["model"])
    start = time.perf_counter()
    pruned = _prune(tool, model, job["calib"], job["fraction"])
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    xt, yt = job["test"]
    result = {"seconds": seconds, "peak_rss_mb": peak, "params": sum(p.numel() for p in pruned.parameters()),
              "accuracy": accuracy(pruned, xt, yt)}
    start = time.perf_counter()
    fine_tune(pruned, *job["train"], epochs=job["ft_epochs"])
    result.update(ft_seconds=time.perf_counter() - start, ft_accuracy=accuracy(pruned, xt, yt))
    with open(out_path, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist_resnet,fmnist_mobilenet")
    parser.add_argument("--fractions", default="0.5,0.75")
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--ft-images", type=int, default=20000)
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    from train_fmnist import accuracy

    import assets

    sections, results = [f"Command: `python benchmarks/pruning.py --fractions {args.fractions} --ft-images "
                         f"{args.ft_images} --ft-epochs {args.ft_epochs}`; torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads."], []
    for name in args.models.split(","):
        spec, data, labels = _fmnist_job(name, 512)
        model = _build(spec)
        n_params = sum(p.numel() for p in model.parameters())
        xt, yt = data["eval"]["test"], labels["test"]
        x, y = assets.fashion_mnist("train")
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:args.ft_images]
        rows = [f"### {name}: float {accuracy(model, xt, yt):.2f}%, {n_params} parameters", "",
                "| target | tool | params kept | accuracy % | + fine-tune % | prune s | peak RSS MB | time / MCT |",
                "|---|---|---|---|---|---|---|---|"]
        notes = []
        for fraction in [float(f) for f in args.fractions.split(",")]:
            runs = {}
            with tempfile.TemporaryDirectory() as tmp:
                job = os.path.join(tmp, "job.pt")
                torch.save({"model": spec, "calib": data["calib"], "test": (xt, yt), "train": (x[pick], y[pick]),
                            "fraction": fraction, "ft_epochs": args.ft_epochs}, job)
                for tool in TOOLS:
                    python = sys.executable if tool == "mct_fx" else args.mct_python
                    if not python or not os.path.exists(python):
                        runs[tool] = {"error": "no --mct-python given"}
                        continue
                    out = os.path.join(tmp, f"{tool}.json")
                    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
                    proc = subprocess.run([python, os.path.abspath(__file__), "--worker", tool, job, out],
                                          capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        sys.stderr.write(proc.stderr[-2000:])
                        runs[tool] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                        continue
                    with open(out) as f:
                        runs[tool] = json.load(f)
            for tool, r in runs.items():
                if "error" in r:
                    rows.append(f"| {fraction:.0%} | {tool} | failed: {r['error'][:160]} | | | | | |")
                    continue
                mct = runs.get("MCT", {})
                ratio = f"{r['seconds'] / mct['seconds']:.2f}" if "seconds" in mct and tool != "MCT" else ""
                rows.append(f"| {fraction:.0%} | {tool} | {r['params'] / n_params:.1%} | {r['accuracy']:.2f} | "
                            f"{r['ft_accuracy']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} |")
            results.append({"model": name, "fraction": fraction, "params": n_params, "runs": runs})
            ours, mct = runs.get("mct_fx", {}), runs.get("MCT", {})
            if fraction == 0.5 and "accuracy" in ours and "accuracy" in mct:
                ok = ours["accuracy"] >= mct["accuracy"] and ours["seconds"] <= mct["seconds"]
                notes.append(f"Target at 50% (accuracy without fine-tune >= MCT's, time <= MCT's): "
                             f"{'PASS' if ok else 'MISS'}")
        sections.append("\n".join(rows + [""] + notes))
        print(sections[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pruning.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, "pruning.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
