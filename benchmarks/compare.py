"""mct_fx side by side with Sony's MCT and torch.ao FX PTQ, on real data: one table per model.

    python benchmarks/compare.py --mct-python .nox/mct-peer/bin/python [--repeats 3]
    nox -s bench        # builds the MCT venv and the assets first

Every method gets the same float model, the same calibration images and the
same evaluation images, and runs in a fresh worker process (so wall time and peak
RSS are its own): ``python benchmarks/compare.py --worker METHOD JOB OUT``.  The
clock starts after the tool's package is imported (MCT's import alone takes 3-4 s
here, mct_fx's 0.2 s; ``import_seconds`` in the JSON), and for mixed precision
after its MIP solver is (MCT's PuLP comes with its package, our SciPy HiGHS
interface is imported on first use: 0.25-0.4 s once per process).
Models:

* ``fmnist_resnet``, ``fmnist_mobilenet``: trained by ``train_fmnist.py``;
  512 calibration images from the training split, accuracy on the 10k test images;
* ``mobilenet_v2``: torchvision's ImageNet weights; 512 calibration crops, top-1
  agreement with float and logit SQNR on 256 evaluation crops of other photos,
  plus top-1 on foolbox's 20 labelled ImageNet samples (see ``assets.py``).

Tables go to stdout and to ``benchmarks/results/compare.{md,json}``.  Later
workflows add rows by adding a :class:`Method` to ``METHODS``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)


# ------------------------------------------------------------------ methods (run inside workers)


def _batches(x: torch.Tensor, size: int = 32) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _mct_fx_ptq(model, job, weight_bits: int = 8):
    import mct_fx
    from mct_fx.tpc.derive import with_bits

    tpc = mct_fx.get_tpc("imx500") if weight_bits == 8 else with_bits(mct_fx.get_tpc("imx500"), weights=weight_bits)
    return mct_fx.quantize(model, _batches(job["calib"]), tpc, verbose=False)


def _mct_fx_mp(model, job, size_bits: int):
    import mct_fx

    budget = mct_fx.ResourceUtilization(weights_memory=job["budgets"][size_bits]["mct_fx"])
    q = mct_fx.quantize(model, _batches(job["calib"]), "imx500", target=budget, verbose=False)
    return q, {"search_seconds": mct_fx.summary(q).mixed_precision.seconds}


def _mct_fx_gptq(model, job):
    import mct_fx
    from mct_fx.tpc.derive import with_bits

    tpc = with_bits(mct_fx.get_tpc("imx500"), weights=4)
    images = job["calib"][:job["gptq"]["images"]]
    return mct_fx.gptq(model, _batches(images), tpc, mct_fx.GPTQConfig(epochs=job["gptq"]["epochs"]), verbose=False)


def _mct_fx_optq(model, job):
    """OPTQ on the GPTQ rows' calibration images (one pass over them, no epochs)."""
    import mct_fx
    from mct_fx.tpc.derive import with_bits

    tpc = with_bits(mct_fx.get_tpc("imx500"), weights=4)
    return mct_fx.quantize(model, _batches(job["calib"][:job["gptq"]["images"]]), tpc,
                           mct_fx.QuantConfig(optq=mct_fx.OPTQConfig()), verbose=False)


def _mct_tpc():
    import model_compression_toolkit as mct

    return mct.get_target_platform_capabilities(tpc_version="1.0", device_type="imx500")


def _mct_gen(calib):
    def gen():
        for b in _batches(calib):
            yield [b]

    return gen


def _mct_weight_bits(model, weight_bits: int) -> dict:
    """MCT's ``core_config`` argument putting every conv / linear kernel at ``weight_bits`` (manual bit-widths)."""
    import model_compression_toolkit as mct

    if weight_bits == 8:
        return {}
    from model_compression_toolkit.core.common.network_editors.node_filters import NodeTypeFilter

    bwc = mct.core.BitWidthConfig()
    present = {type(m) for m in model.modules()}  # MCT rejects a filter that matches no node
    layers = [NodeTypeFilter(t) for t in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)
              if t in present]
    bwc.set_manual_weights_bit_width(layers, weight_bits, "weight")
    return {"core_config": mct.core.CoreConfig(bit_width_config=bwc)}


def _mct_ptq(model, job, weight_bits: int = 8):
    import model_compression_toolkit as mct

    q, _ = mct.ptq.pytorch_post_training_quantization(model, _mct_gen(job["calib"]),
                                                      target_platform_capabilities=_mct_tpc(),
                                                      **_mct_weight_bits(model, weight_bits))
    return q


def _mct_gptq(model, job):
    import model_compression_toolkit as mct

    images = job["calib"][:job["gptq"]["images"]]
    q, _ = mct.gptq.pytorch_gradient_post_training_quantization(
        model, _mct_gen(images), gptq_config=mct.gptq.get_pytorch_gptq_config(n_epochs=job["gptq"]["epochs"]),
        target_platform_capabilities=_mct_tpc(), **_mct_weight_bits(model, 4))
    return q


def _mct_mp(model, job, size_bits: int):
    import model_compression_toolkit as mct
    from model_compression_toolkit.core import runner

    ru = mct.core.ResourceUtilization(weights_memory=job["budgets"][size_bits]["mct"])
    core_config = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(
        num_of_images=32))
    search, spent = runner.search_bit_width, []

    def timed(*args, **kwargs):  # MCT's search phase (sensitivities + integer program), as ours reports it
        start = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    runner.search_bit_width = timed
    try:
        q, _ = mct.ptq.pytorch_post_training_quantization(model, _mct_gen(job["calib"]),
                                                          target_resource_utilization=ru, core_config=core_config,
                                                          target_platform_capabilities=_mct_tpc())
    finally:
        runner.search_bit_width = search
    return q, {"search_seconds": sum(spent)}


class ChannelMean(torch.nn.Module):
    """Three channels to one: MCT's data generation makes 3-channel images only (its input size is fixed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


def _mct_fx_generate(model, job) -> tuple[torch.Tensor, float]:
    import mct_fx

    spec = job["datagen"]
    config = mct_fx.DataGenConfig(n_iter=spec["iters"], extra_pixels=spec["extra_pixels"],
                                  normalization=spec["normalization"])
    start = time.perf_counter()
    images = mct_fx.generate_data(model, spec["images"], spec["shape"], config, verbose=False)
    return images, time.perf_counter() - start


def _mct_generate(model, job) -> tuple[torch.Tensor, float]:
    """MCT's generator with the same images, iterations, batch size and canvas margin; a grey model gets a
    channel-mean adapter in front (and the images their channel mean)."""
    import model_compression_toolkit as mct
    from model_compression_toolkit.data_generation import ImageNormalizationType

    spec = job["datagen"]
    grey = spec["shape"][0] == 1
    net = torch.nn.Sequential(ChannelMean(), model).eval() if grey else model
    norm = {"none": ImageNormalizationType.NO_NORMALIZATION, "torchvision": ImageNormalizationType.TORCHVISION}
    config = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=spec["iters"], data_gen_batch_size=32, extra_pixels=spec["extra_pixels"],
        image_normalization_type=norm[spec["normalization"]])
    start = time.perf_counter()
    images = torch.cat(mct.data_generation.pytorch_data_generation_experimental(
        net, spec["images"], spec["shape"][-1], config))
    seconds = time.perf_counter() - start
    return (images.mean(1, keepdim=True) if grey else images), seconds


def _data_free(generate, quantize):
    """A method that generates its calibration images first, then runs ``quantize`` on them."""
    def run(model, job):
        images, seconds = generate(model, job)
        return quantize(model, {**job, "calib": images}), {"generation_seconds": seconds}

    return run


def _torch_ao_ptq(model, job):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calib = job["calib"]
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(calib[:1],))
    with torch.no_grad():
        for b in _batches(calib):
            prepared(b)
    return convert_fx(prepared)


def weight_budgets(model: torch.nn.Module, example: torch.Tensor, size_bits: tuple[int, ...] = (4, 3)) -> dict:
    """Weights budgets of the size of every Conv/Linear kernel at ``b`` bits, in each tool's own accounting.

    MCT counts quantized kernels only; mct_fx counts every parameter (biases and
    float layers at 32 bits): its budget is its 8-bit size less the kernel bytes saved.
    """
    import mct_fx

    kernels = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)))
    ours8 = mct_fx.resource_utilization(model, example).weights_memory
    return {b: {"mct": kernels * b / 8, "mct_fx": ours8 - kernels * (8 - b) / 8} for b in size_bits}


@dataclass(frozen=True)
class Method:
    name: str
    bits: str
    peer: str  # which python runs it: "ours" (this venv) or "mct" (the MCT venv)
    run: Callable  # (float model, job: calibration images and budgets) -> quantized callable [, extras dict]
    packages: tuple[str, ...] = ()  # imported before the clock starts (default: the peer's package)

    def imports(self) -> tuple[str, ...]:
        return self.packages or ({"ours": "mct_fx", "mct": "model_compression_toolkit"}[self.peer],)


_MP_IMPORTS = ("mct_fx", "scipy.optimize")

METHODS = {m.name: m for m in (
    Method("mct_fx PTQ", "W8A8", "ours", _mct_fx_ptq),
    Method("MCT PTQ", "W8A8", "mct", _mct_ptq),
    Method("torch.ao FX PTQ (x86)", "W8A8", "ours", _torch_ao_ptq, ("torch.ao.quantization.quantize_fx",)),
    Method("mct_fx PTQ W4A8", "W4A8", "ours", lambda model, job: _mct_fx_ptq(model, job, 4)),
    Method("MCT PTQ W4A8", "W4A8", "mct", lambda model, job: _mct_ptq(model, job, 4)),
    # MCT imports its MIP solver (PuLP) with its package; ours (SciPy's HiGHS) is imported on first use
    Method("mct_fx MP 4-bit size", "MP W8/4/2 A8", "ours", lambda model, job: _mct_fx_mp(model, job, 4), _MP_IMPORTS),
    Method("MCT MP 4-bit size", "MP W8/4/2 A8", "mct", lambda model, job: _mct_mp(model, job, 4)),
    Method("mct_fx MP 3-bit size", "MP W8/4/2 A8", "ours", lambda model, job: _mct_fx_mp(model, job, 3), _MP_IMPORTS),
    Method("MCT MP 3-bit size", "MP W8/4/2 A8", "mct", lambda model, job: _mct_mp(model, job, 3)),
    Method("mct_fx GPTQ W4A8", "W4A8", "ours", _mct_fx_gptq),
    Method("MCT GPTQ W4A8", "W4A8", "mct", _mct_gptq),
    Method("mct_fx OPTQ W4A8", "W4A8", "ours", _mct_fx_optq),
    Method("mct_fx data-free PTQ", "W8A8", "ours", _data_free(_mct_fx_generate, _mct_fx_ptq)),
    Method("MCT data-free PTQ", "W8A8", "mct", _data_free(_mct_generate, _mct_ptq)),
    Method("mct_fx data-free GPTQ W4A8", "W4A8", "ours", _data_free(_mct_fx_generate, _mct_fx_gptq)),
    Method("MCT data-free GPTQ W4A8", "W4A8", "mct", _data_free(_mct_generate, _mct_gptq)),
)}


def mct_peer(name: str) -> str | None:
    """The MCT row doing the same job as row ``name``: the same name with MCT for ours (OPTQ's: MCT's GPTQ),
    MCT's W8A8 PTQ for torch.ao, none for MCT's own."""
    if name.startswith("mct_fx"):
        return name.replace("mct_fx", "MCT").replace("OPTQ", "GPTQ")
    return "MCT PTQ" if not name.startswith("MCT") else None


def _peak_rss_mb() -> float:
    """This process's peak resident memory.  VmHWM, not ru_maxrss: Linux carries the parent's
    high-water mark into ru_maxrss across fork + exec, and the parent holds all the data."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(spec: dict) -> torch.nn.Module:
    if spec["kind"] == "fmnist":
        from fmnist_models import MODELS

        model = MODELS[spec["name"]]()
        model.load_state_dict(torch.load(spec["path"], weights_only=True)["state_dict"])
    else:
        import torchvision

        model = torchvision.models.get_model(spec["name"], weights=spec["weights"])
    return model.eval()


def worker(method: str, job_path: str, out_path: str) -> None:
    torch.manual_seed(0)
    job = torch.load(job_path, weights_only=False)
    model = _build(job["model"])
    start = time.perf_counter()  # a process pays the tool's import once: timed apart from the work
    for package in METHODS[method].imports():
        importlib.import_module(package)
    import_seconds = time.perf_counter() - start
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    qmodel = METHODS[method].run(model, job)
    seconds = time.perf_counter() - start
    qmodel, extras = qmodel if isinstance(qmodel, tuple) else (qmodel, {})
    peak = _peak_rss_mb()
    logits = {}
    with torch.no_grad():
        for name, x in job["eval"].items():
            logits[name] = torch.cat([qmodel(b) for b in _batches(x, 100)]).float()
    torch.save({"seconds": seconds, "import_seconds": import_seconds, "peak_rss_mb": peak,
                "baseline_rss_mb": baseline, "logits": logits,
                "threads": torch.get_num_threads(), **extras}, out_path)


# ------------------------------------------------------------------ jobs (parent process)


def _fmnist_job(name: str, n_calib: int) -> tuple[dict, dict, dict]:
    import train_fmnist

    import assets

    train_fmnist.load(name)  # trains and caches when missing
    x, _ = assets.fashion_mnist("train")
    xt, yt = assets.fashion_mnist("test")
    calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_calib]]
    spec = {"kind": "fmnist", "name": name, "path": train_fmnist.path_of(name)}
    return spec, {"calib": calib, "eval": {"test": xt}}, {"test": yt}


def _mobilenet_job(n_calib: int) -> tuple[dict, dict, dict]:
    import assets

    assets.mobilenet_v2_weights()
    calib, crops = assets.imagenet_fidelity_sets(n_calib, 256)
    samples, labels = assets.foolbox_imagenet()
    spec = {"kind": "torchvision", "name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    return spec, {"calib": calib, "eval": {"crops": crops, "foolbox": samples}}, {"foolbox": labels}


def _quality(logits: dict, float_logits: dict, labels: dict) -> dict:
    """Per evaluation set: top-1 accuracy (labelled sets), top-1 agreement with float and logit SQNR."""
    import zoo

    q = {}
    for name, lg in logits.items():
        if name in labels:
            q[f"{name}_accuracy"] = float((lg.argmax(1) == labels[name]).float().mean()) * 100
        q[f"{name}_agreement"] = float((lg.argmax(1) == float_logits[name].argmax(1)).float().mean()) * 100
        q[f"{name}_sqnr_db"] = zoo.sqnr_db(float_logits[name], lg)
    return q


def run_model(model_name: str, methods: list[str], args) -> dict:
    job_spec, data, labels = (_mobilenet_job(args.n_calib) if model_name == "mobilenet_v2"
                              else _fmnist_job(model_name, args.n_calib))
    model = _build(job_spec)
    with torch.no_grad():
        float_logits = {k: torch.cat([model(b) for b in _batches(x, 100)]) for k, x in data["eval"].items()}
    result = {"model": model_name, "n_calib": len(data["calib"]), "float": _quality(float_logits, float_logits, labels),
              "methods": {}}
    small = model_name != "mobilenet_v2"
    data["gptq"] = {"images": args.gptq_images or (len(data["calib"]) if small else 32),
                    "epochs": args.gptq_epochs or (5 if small else 1)}
    result["gptq"] = data["gptq"]
    if any("data-free" in m for m in methods):
        shape = tuple(data["calib"].shape[1:])
        data["datagen"] = {"images": args.datagen_images or (256 if small else 64),
                           "iters": args.datagen_iters or (200 if small else 100), "shape": shape,
                           "extra_pixels": 4 if small else 32, "normalization": "none" if small else "torchvision"}
        result["datagen"] = data["datagen"]
    if any(m.startswith("mct_fx MP") or m.startswith("MCT MP") for m in methods):
        data["budgets"] = weight_budgets(model, data["calib"][:1])
        result["budgets"] = data["budgets"]
    with tempfile.TemporaryDirectory() as tmp:
        job_path = os.path.join(tmp, "job.pt")
        torch.save({"model": job_spec, **data}, job_path)
        for name in methods:
            python = sys.executable if METHODS[name].peer == "ours" else args.mct_python
            if not python or not os.path.exists(python):
                result["methods"][name] = {"error": "no --mct-python given"}
                continue
            runs = []
            for r in range(args.repeats):
                out = os.path.join(tmp, f"out{r}.pt")
                proc = subprocess.run([python, os.path.abspath(__file__), "--worker", name, job_path, out],
                                      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                          [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])))
                if proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines()
                    runs = [{"error": lines[-1] if lines else f"exit status {proc.returncode}"}]
                    sys.stderr.write(proc.stderr[-2000:])
                    break
                runs.append(torch.load(out, weights_only=False))
            if "error" in runs[0]:
                result["methods"][name] = runs[0]
                continue
            result["methods"][name] = {
                "bits": METHODS[name].bits,
                "seconds": statistics.median(r["seconds"] for r in runs),
                "seconds_all": [r["seconds"] for r in runs],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "baseline_rss_mb": min(r["baseline_rss_mb"] for r in runs),
                "threads": runs[0]["threads"],
                **_quality(runs[-1]["logits"], float_logits, labels),
                **{k: statistics.median(r[k] for r in runs)
                   for k in ("import_seconds", "generation_seconds", "search_seconds") if k in runs[0]},
            }
    return result


# ------------------------------------------------------------------ tables


def _headline(result: dict) -> tuple[str, str]:
    """The quality key a table leads with, and its label."""
    if result["model"] == "mobilenet_v2":
        return "crops_agreement", "top-1 agreement %"
    return "test_accuracy", "accuracy %"


def _evaluation_set(result: dict) -> str:
    return "crops" if result["model"] == "mobilenet_v2" else "test"


def table(result: dict) -> str:
    key, label = _headline(result)
    ev = _evaluation_set(result)
    ref = result["float"].get(key, 100.0)
    extra = result["model"] == "mobilenet_v2"
    head = ["method", "bits", label, "drop vs float", "logit SQNR dB"]
    head += ["foolbox top-1 %"] if extra else ["top-1 agreement %"]
    head += ["quantize s", "peak RSS MB", "time / MCT", "memory / MCT"]
    rows = [head, ["float", "32", f"{ref:.2f}", "", "",
                   f"{result['float']['foolbox_accuracy']:.0f}" if extra else "", "", "", "", ""]]
    for name, m in result["methods"].items():
        if "error" in m:
            rows.append([name, "", f"failed: {m['error'][:80]}"] + [""] * (len(head) - 3))
            continue
        row = [name, m["bits"], f"{m[key]:.2f}", f"{ref - m[key]:+.2f}", f"{m[ev + '_sqnr_db']:.2f}"]
        row += [f"{m['foolbox_accuracy']:.0f}"] if extra else [f"{m['test_agreement']:.2f}"]
        seconds = f"{m['seconds']:.1f}"
        if "generation_seconds" in m:  # data-free rows: the time includes generating the images
            seconds += f" (generation {m['generation_seconds']:.1f})"
        # mixed-precision rows: the search phase timed inside the run; ours: the candidates' quantizers,
        # sensitivities and integer program; MCT's search_bit_width: sensitivities and integer program (its
        # candidates' parameters come earlier, with PTQ's), so "MP run - PTQ run" is the like-for-like cost
        if "search_seconds" in m:
            seconds += f" (search {m['search_seconds']:.2f})"
        row += [seconds, f"{m['peak_rss_mb']:.0f}"]
        mct = result["methods"].get(mct_peer(name), {})
        if "seconds" in mct:
            row += [f"{m['seconds'] / mct['seconds']:.2f}", f"{m['peak_rss_mb'] / mct['peak_rss_mb']:.2f}"]
        else:
            row += ["", ""]
        rows.append(row)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return f"### {result['model']} ({result['n_calib']} calibration images)\n\n" + "\n".join(lines)


def targets(result: dict) -> list[str]:
    """The issue's W8A8 targets, each PASS or MISS with the numbers."""
    key, _ = _headline(result)
    ours, mct = result["methods"].get("mct_fx PTQ", {}), result["methods"].get("MCT PTQ", {})
    ao = result["methods"].get("torch.ao FX PTQ (x86)", {})
    ref = result["float"].get(key, 100.0)
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    ours4, mct4 = result["methods"].get("mct_fx PTQ W4A8", {}), result["methods"].get("MCT PTQ W4A8", {})
    if key in ours:  # W8A8
        drop = ref - ours[key]
        if result["model"] != "mobilenet_v2":
            check(drop <= 0.3, f"accuracy drop {drop:.2f} <= 0.3 points")
            if key in mct:
                check(drop <= ref - mct[key] + 1e-9, f"drop {drop:.2f} <= MCT's {ref - mct[key]:.2f}")
        elif key in mct:
            check(ours[key] >= mct[key], f"top-1 agreement {ours[key]:.2f}% >= MCT's {mct[key]:.2f}%")
        if "seconds" in mct:
            check(ours["seconds"] <= mct["seconds"] / 5,
                  f"time {ours['seconds']:.1f} s <= MCT's / 5 = {mct['seconds'] / 5:.1f} s")
            check(ours["peak_rss_mb"] <= mct["peak_rss_mb"],
                  f"peak RSS {ours['peak_rss_mb']:.0f} MB <= MCT's {mct['peak_rss_mb']:.0f} MB")
        if "seconds" in ao:
            check(ours["seconds"] <= 2 * ao["seconds"],
                  f"time {ours['seconds']:.1f} s <= 2 x torch.ao's {ao['seconds']:.1f} s")
        if result["model"] == "mobilenet_v2" and key in ours4 and key in mct4:
            check(ours4[key] >= mct4[key], f"W4A8 top-1 agreement {ours4[key]:.2f}% >= MCT's {mct4[key]:.2f}%")
        if result["model"] != "mobilenet_v2":
            check(drop <= 0.2, f"W8A8 accuracy drop {drop:.2f} <= 0.2 points (advanced-PTQ target)")
    for b in (4, 3):  # mixed precision (issue 7): quality >= MCT's at the same budget, search <= 1/3 of MCT's
        mp, mct_mp = result["methods"].get(f"mct_fx MP {b}-bit size", {}), result["methods"].get(
            f"MCT MP {b}-bit size", {})
        if key not in mp or key not in mct_mp:
            continue
        check(mp[key] >= mct_mp[key], f"MP at the {b}-bit size: {mp[key]:.2f} >= MCT's {mct_mp[key]:.2f}")
        if "seconds" in ours and "seconds" in mct:
            search, mct_search = mp["seconds"] - ours["seconds"], mct_mp["seconds"] - mct["seconds"]
            check(search <= mct_search / 3, f"MP {b}-bit search time (MP run - PTQ run) {search:.1f} s <= "
                                              f"MCT's / 3 = {mct_search / 3:.1f} s")
        if b == 4 and key in ours4:
            check(mp[key] > ours4[key], f"MP at the 4-bit size {mp[key]:.2f} > uniform W4A8 {ours4[key]:.2f}")
    mct_gptq = result["methods"].get("MCT GPTQ W4A8", {})
    for name in ("GPTQ W4A8", "OPTQ W4A8"):  # issue 8: quality >= MCT's GPTQ, time <= 1/10, memory <= MCT's
        gptq = result["methods"].get(f"mct_fx {name}", {})
        if key in gptq and key in mct_gptq:
            setup = f"{result['gptq']['images']} images, {result['gptq']['epochs']} epoch(s) for GPTQ"
            check(gptq[key] >= mct_gptq[key], f"{name} ({setup}): {gptq[key]:.2f} >= MCT GPTQ's {mct_gptq[key]:.2f}")
            check(gptq["seconds"] <= mct_gptq["seconds"] / 10,
                  f"{name} time {gptq['seconds']:.1f} s <= MCT GPTQ's / 10 = {mct_gptq['seconds'] / 10:.1f} s")
            check(gptq["peak_rss_mb"] <= mct_gptq["peak_rss_mb"],
                  f"{name} peak RSS {gptq['peak_rss_mb']:.0f} MB <= MCT GPTQ's {mct_gptq['peak_rss_mb']:.0f} MB")
        if key in gptq and key in ours4:
            check(gptq[key] > ours4[key], f"{name} {gptq[key]:.2f} > PTQ W4A8 {ours4[key]:.2f}")
    free, mct_free = result["methods"].get("mct_fx data-free PTQ", {}), result["methods"].get("MCT data-free PTQ", {})
    if key in free and key in ours:  # issue 10: data-free W8A8 close to real-data PTQ, generation <= 1/2 of MCT's
        gap = 0.5 if result["model"] != "mobilenet_v2" else 1.0
        check(free[key] >= ours[key] - gap, f"data-free W8A8 {free[key]:.2f} within {gap} of real-data PTQ "
                                            f"{ours[key]:.2f}")
    for name in ("PTQ", "GPTQ W4A8"):
        a, b = result["methods"].get(f"mct_fx data-free {name}", {}), result["methods"].get(f"MCT data-free {name}", {})
        if "generation_seconds" in a and "generation_seconds" in b:
            setup = f"{result['datagen']['images']} images, {result['datagen']['iters']} iterations"
            check(a["generation_seconds"] <= b["generation_seconds"] / 2,
                  f"generation ({setup}) {a['generation_seconds']:.1f} s <= MCT's / 2 = "
                  f"{b['generation_seconds'] / 2:.1f} s")
    if key in free and key in mct_free:
        check(free[key] >= mct_free[key], f"data-free W8A8 {free[key]:.2f} >= MCT's {mct_free[key]:.2f}")
    return out or ["- nothing to compare"]


def chosen_methods(parser: argparse.ArgumentParser, text: str, known: dict) -> list[str]:
    """The comma-separated method names of ``text``; an unknown one is a usage error listing ``known``."""
    methods = [m.strip() for m in text.split(",")]
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(known)}")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist_resnet,fmnist_mobilenet,mobilenet_v2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; times are medians")
    parser.add_argument("--n-calib", type=int, default=512)
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--gptq-images", type=int, default=None,
                        help="GPTQ rows: calibration images (default: all on Fashion-MNIST, 32 on MobileNetV2)")
    parser.add_argument("--gptq-epochs", type=int, default=None,
                        help="GPTQ rows: epochs (default: 5 on Fashion-MNIST, 1 on MobileNetV2)")
    parser.add_argument("--datagen-images", type=int, default=None,
                        help="data-free rows: generated images (default 256 on Fashion-MNIST, 64 on MobileNetV2)")
    parser.add_argument("--datagen-iters", type=int, default=None,
                        help="data-free rows: generation iterations (default 200 on Fashion-MNIST, 100 on MobileNetV2)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="also put the tables into README.md's Results section")
    args = parser.parse_args()
    methods = chosen_methods(parser, args.methods, METHODS)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; medians of {args.repeats} run(s); times exclude importing "
               f"the tool")
    argv = sys.argv[1:]  # as run, without the local path of the MCT venv
    shown = [a for i, a in enumerate(argv) if not a.startswith("--mct-python")
             and not (i and argv[i - 1] == "--mct-python")]
    results, sections = [], [f"Machine: {machine}.", f"Command: `python benchmarks/compare.py {shlex.join(shown)}`."]
    for name in [m.strip() for m in args.models.split(",")]:
        result = run_model(name, methods, args)
        results.append(result)
        section = table(result) + "\n\nTargets:\n" + "\n".join(targets(result))
        sections.append(section)
        print(section + "\n", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'compare.md')} and compare.json")
    if args.readme:
        update_readme("\n\n".join(sections))


def update_readme(tables: str, path: str = os.path.join(os.path.dirname(HERE), "README.md")) -> None:
    """Replace what lies between the Results markers of the README with ``tables``."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{tables}\n{end}{tail}")
    print(f"updated the Results section of {path}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
