"""Detectors to the IMX500: mct_fx beside Sony's MCT and torch.ao, measured in mAP on Fashion-MNIST mosaics.

    python benchmarks/detection.py [--detectors yolo,ssd] [--methods ...] [--mct-python PATH]
                                   [--converter PATH] [--n-test 2000] [--n-onnx 500]

Per detector (``train_detection.py`` trains and caches them; their ``forward`` ends in
``edgemdt_cl``'s ``multiclass_nms``): float; mct_fx PTQ W8A8, GPTQ W4A8 and mixed precision at
the 4-bit weight size on the whole model (the NMS traced as one call, left float) for
``imx500_16bit`` (the box coordinates at 16 bits, found from the graph; the rest 8-bit), and PTQ
for ``imx500`` (8 bits everywhere); MCT PTQ / GPTQ / MP set up as Ultralytics' IMX export sets it
(TPC v4.0, the decode ops at 16 bits by name), and PTQ with its default TPC v1.0 (8 bits), all
on the network without the NMS (the way Ultralytics' IMX export runs MCT: its C2f blocks switched
to ``forward_split``, since MCT's tracer cannot unpack ``chunk``), the NMS put back after it;
torch.ao FX PTQ (x86) on the whole model where it runs. Each method runs in a fresh worker
process (``--worker METHOD JOB OUT``), so its time and peak RSS are its own; every method gets the
same calibration canvases (from the training split) and is scored on the same test canvases with
torchmetrics' COCO mAP. The PTQ rows are also exported in MCTQ ONNX (ours: ``export_imx500``; MCT:
``pytorch_export_model`` of the network with the NMS), converted by ``imxconv-pt`` (memory report),
and the converted file is run in onnxruntime with the reference kernels on the first ``--n-onnx``
test canvases (mAP there beside the GraphModule's on the same canvases).

The targets give each comparison with MCT also as a paired difference over ten blocks of the test
canvases (mean +- 2 standard errors: what the choice of canvases alone could make). A method stopped
by ``--method-timeout`` is kept as a lower bound on its time.

Tables go to stdout and to ``benchmarks/results/detection.{md,json}``. A run adds its rows to the
results already there (a row of the same detector and method is replaced; a detector whose float
mAP, test or calibration canvases, ONNX subset or GPTQ epochs differ starts afresh: ``SAME_DATA``),
so a slow row can be run on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shlex
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

from compare import (  # noqa: E402
    _MP_IMPORTS,
    _batches,
    _mct_gen,
    _mct_tpc,
    _peak_rss_mb,
    _torch_ao_ptq,
    chosen_methods,
    mct_peer,
    weight_budgets,
)
from detection_models import DETECTORS, PreNms, WithNms  # noqa: E402

# ------------------------------------------------------------------ methods (run inside workers)


def _ours_ptq(model, job, tpc: str = "imx500_16bit"):
    import mct_fx

    return mct_fx.quantize(model, _batches(job["calib"]), tpc, verbose=False)


def _w4(model, keep_readout: bool = True):
    """The W4A8 setup of both tools: 4-bit kernels but YOLO's DFL readout (a fixed 1x1 conv with weights
    0..15: at 4 bits the expected distances it reads out are lost), which stays at 8 bits unless not
    ``keep_readout``; returns ``(tpc, quant_config)``."""
    import mct_fx
    from mct_fx.tpc.derive import with_bits

    tpc = with_bits(mct_fx.get_tpc("imx500_16bit"), weights=4)
    keep = tuple(mct_fx.LayerOverride(name=n, weights_n_bits=8) for n in _readout_modules(model) if keep_readout)
    return tpc, mct_fx.QuantConfig(overrides=keep)


def _ours_gptq(model, job, keep_readout: bool = True):
    import mct_fx

    tpc, quant_config = _w4(model, keep_readout)
    return mct_fx.gptq(model, _batches(job["calib"]), tpc, mct_fx.GPTQConfig(epochs=job["gptq_epochs"]),
                       quant_config=quant_config, verbose=False)


def _ours_optq(model, job):
    import mct_fx

    tpc, quant_config = _w4(model)
    optq = dataclasses.replace(quant_config, optq=mct_fx.OPTQConfig())
    return mct_fx.quantize(model, _batches(job["calib"]), tpc, optq, verbose=False)


def _ours_mp(model, job):
    import mct_fx

    budget = mct_fx.ResourceUtilization(weights_memory=job["budgets"][4]["mct_fx"])
    return mct_fx.quantize(model, _batches(job["calib"]), "imx500_16bit", target=budget, verbose=False)


def _mct_ptq(model, job):
    """MCT as its IMX500 default: TPC v1.0, 8-bit activations everywhere."""
    import model_compression_toolkit as mct

    q, _ = mct.ptq.pytorch_post_training_quantization(PreNms(model, split=True).eval(), _mct_gen(job["calib"]),
                                                      target_platform_capabilities=_mct_tpc())
    return WithNms(q).eval()


def _mct_ptq_as_written(model, job):
    """MCT on the network as written (for the YOLO: C2f unpacking ``chunk``)."""
    import model_compression_toolkit as mct

    q, _ = mct.ptq.pytorch_post_training_quantization(PreNms(model).eval(), _mct_gen(job["calib"]),
                                                      target_platform_capabilities=_mct_tpc())
    return WithNms(q).eval()


def _readout_modules(model: torch.nn.Module) -> list[str]:
    """Module paths of fixed readout layers kept at 8 bits in the W4 rows (YOLO's DFL)."""
    return ["dfl"] if hasattr(model, "dfl") else []


def _decode_names(net: torch.nn.Module) -> list[str]:
    """fx node names of the ops computing the boxes output after the last module call (YOLO's decode:
    sub / add / mul; MCT 2.6.1's TPC v4.0 offers no 16-bit concat), the nodes Ultralytics' IMX export
    sets to 16 bits by name."""
    gm = torch.fx.symbolic_trace(net)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    names, todo = [], [out]
    while todo:
        node = todo.pop()
        if node.op in ("call_function", "call_method") and node.name not in names:
            names.append(node.name)
            todo.extend(node.all_input_nodes)
    return [n for n in names if n.split("_")[0] in ("sub", "add", "mul")]


def _mct_16bit_boxes(model, weight_bits: int = 8, **core):
    """``(network, kwargs)`` for MCT set up as Ultralytics' IMX export does: TPC v4.0, the box decoding at
    16-bit activations by name; kernels at ``weight_bits`` (manual) unless 8."""
    import model_compression_toolkit as mct
    from model_compression_toolkit.core.common.network_editors import NodeNameFilter, NodeTypeFilter

    net = PreNms(model, split=True).eval()
    bwc = mct.core.BitWidthConfig()
    for name in _decode_names(net):
        bwc.set_manual_activation_bit_width([NodeNameFilter(name)], 16)
    if weight_bits != 8:
        present = {type(m) for m in model.modules()}
        bwc.set_manual_weights_bit_width([NodeTypeFilter(t) for t in (torch.nn.Conv2d, torch.nn.Linear)
                                          if t in present], weight_bits, "weight")
        gm = torch.fx.symbolic_trace(net)
        readouts = [n.name for n in gm.graph.nodes if n.op == "call_module"
                    and n.target in {f"detector.{m}" for m in _readout_modules(model)}]
        if readouts:  # later selections override earlier ones in MCT's BitWidthConfig
            bwc.set_manual_weights_bit_width([NodeNameFilter(n) for n in readouts], 8, "weight")
    tpc = mct.get_target_platform_capabilities(tpc_version="4.0", device_type="imx500")
    return net, {"core_config": mct.core.CoreConfig(bit_width_config=bwc, **core),
                 "target_platform_capabilities": tpc}


def _mct_ptq16(model, job):
    import model_compression_toolkit as mct

    net, kwargs = _mct_16bit_boxes(model)
    q, _ = mct.ptq.pytorch_post_training_quantization(net, _mct_gen(job["calib"]), **kwargs)
    return WithNms(q).eval()


def _mct_gptq(model, job, default: bool = False):
    """MCT GPTQ W4A8 with Hessian weighting off, as Ultralytics' IMX export runs it; ``default``: as
    ``get_pytorch_gptq_config(n_epochs)`` gives it (Hessian-weighted sample-layer attention, the
    Hessian of every calibration canvas)."""
    import model_compression_toolkit as mct

    net, kwargs = _mct_16bit_boxes(model, 4)
    hessian = {} if default else {"use_hessian_based_weights": False, "use_hessian_sample_attention": False}
    q, _ = mct.gptq.pytorch_gradient_post_training_quantization(
        net, _mct_gen(job["calib"]), gptq_config=mct.gptq.get_pytorch_gptq_config(
            n_epochs=job["gptq_epochs"], **hessian), **kwargs)
    return WithNms(q).eval()


def _mct_mp(model, job):
    import model_compression_toolkit as mct

    ru = mct.core.ResourceUtilization(weights_memory=job["budgets"][4]["mct"])
    net, kwargs = _mct_16bit_boxes(model, mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(
        num_of_images=32))
    q, _ = mct.ptq.pytorch_post_training_quantization(net, _mct_gen(job["calib"]), target_resource_utilization=ru,
                                                      **kwargs)
    return WithNms(q).eval()


def _ours_export(qmodel, x, path: str) -> None:
    import mct_fx

    mct_fx.export_imx500(qmodel, x, path)


def _mct_export(qmodel, x, path: str) -> None:
    """MCT's MCTQ export (its ``torch.onnx.export`` call forced to the TorchScript exporter, which MCT 2.6
    needs on torch 2.14, as in benchmarks/imx500.py)."""
    import model_compression_toolkit as mct

    original = torch.onnx.export

    def scripted(*args, **kwargs):
        kwargs["dynamo"] = False
        return original(*args, **kwargs)

    torch.onnx.export = scripted
    try:
        mct.exporter.pytorch_export_model(qmodel, save_model_path=path, repr_dataset=lambda: iter([[x]]),
                                          serialization_format=mct.exporter.PytorchExportSerializationFormat.ONNX,
                                          quantization_format=mct.exporter.QuantizationFormat.MCTQ)
    finally:
        torch.onnx.export = original


@dataclass(frozen=True)
class Method:
    name: str
    bits: str
    peer: str  # "ours" (this venv) or "mct" (the MCT venv)
    run: Callable  # (float detector, job) -> quantized detector (NMS outputs)
    export: Callable | None = None  # (quantized detector, x[:1], path): the IMX500 file
    packages: tuple[str, ...] = ()

    def imports(self) -> tuple[str, ...]:
        return self.packages or ({"ours": "mct_fx", "mct": "model_compression_toolkit"}[self.peer],)


METHODS = {m.name: m for m in (
    Method("mct_fx PTQ", "W8A8, boxes A16", "ours", _ours_ptq, _ours_export),
    Method("MCT PTQ", "W8A8, boxes A16", "mct", _mct_ptq16, _mct_export),
    Method("mct_fx PTQ (8-bit boxes)", "W8A8", "ours", lambda model, job: _ours_ptq(model, job, "imx500")),
    Method("MCT PTQ (8-bit boxes)", "W8A8", "mct", _mct_ptq),
    Method("MCT PTQ (model as written)", "W8A8", "mct", _mct_ptq_as_written),
    Method("torch.ao FX PTQ (x86)", "W8A8", "ours", _torch_ao_ptq, packages=("torch.ao.quantization.quantize_fx",)),
    Method("mct_fx GPTQ W4A8", "W4A8 (DFL W8), boxes A16", "ours", _ours_gptq),
    Method("MCT GPTQ W4A8", "W4A8 (DFL W8), boxes A16", "mct", _mct_gptq),
    Method("mct_fx OPTQ W4A8", "W4A8 (DFL W8), boxes A16", "ours", _ours_optq),
    Method("MCT GPTQ W4A8 (MCT default)", "W4A8 (DFL W8), boxes A16", "mct",
           lambda model, job: _mct_gptq(model, job, default=True)),
    Method("mct_fx GPTQ W4A8 (DFL W4)", "W4A8, boxes A16", "ours", lambda model, job: _ours_gptq(model, job, False)),
    Method("mct_fx MP 4-bit size", "MP W8/4/2 A8, boxes A16", "ours", _ours_mp, packages=_MP_IMPORTS),
    Method("MCT MP 4-bit size", "MP W8/4/2 A8, boxes A16", "mct", _mct_mp),
)}


def _outputs(detect, x: torch.Tensor, batch_size: int = 50) -> tuple[torch.Tensor, ...]:
    parts = []
    with torch.no_grad():
        for b in _batches(x, batch_size):
            parts.append(tuple(torch.as_tensor(t) for t in detect(b)))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def worker(method: str, job_path: str, out_path: str) -> None:
    torch.manual_seed(0)
    job = torch.load(job_path, weights_only=False)
    model = DETECTORS[job["detector"]]()
    model.load_state_dict(job["state_dict"])
    model.eval()
    spec = METHODS[method]
    start = time.perf_counter()
    for package in spec.imports():
        importlib.import_module(package)
    import_seconds = time.perf_counter() - start
    start = time.perf_counter()
    qmodel = spec.run(model, job)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    out = {"seconds": seconds, "import_seconds": import_seconds, "peak_rss_mb": peak,
           "outputs": _outputs(qmodel, job["test"]), "threads": torch.get_num_threads()}
    if spec.export is not None and job.get("export_dir"):
        path = os.path.join(job["export_dir"], f"{job['detector']}_{spec.peer}.onnx")
        try:
            start = time.perf_counter()
            spec.export(qmodel, job["test"][:1], path)
            out["export"] = {"path": path, "seconds": time.perf_counter() - start}
        except Exception as e:  # noqa: BLE001 (reported in the table)
            out["export"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    torch.save(out, out_path)


# ------------------------------------------------------------------ the parent

BLOCKS = 10  # parts of the test canvases for the paired differences in the targets


def _map(name: str, outputs: tuple[torch.Tensor, ...], targets: list[dict]) -> dict[str, float]:
    from train_detection import Mosaics, mean_ap

    images = torch.zeros(len(targets), 1, 1, 1)  # mean_ap only slices them
    index = iter(range(0, len(targets), 50))

    def replay(_x):
        i = next(index)
        return tuple(t[i:i + 50] for t in outputs)

    return mean_ap(replay, name, Mosaics(images, targets), 50)


def _block_maps(name: str, outputs: tuple[torch.Tensor, ...], targets: list[dict], blocks: int = BLOCKS) -> list[float]:
    """mAP@0.5:0.95 of each of ``blocks`` consecutive equal parts of the test canvases (for paired differences)."""
    size = len(targets) // blocks
    return [_map(name, tuple(t[i * size:(i + 1) * size] for t in outputs), targets[i * size:(i + 1) * size])["map"]
            for i in range(blocks)] if size else []


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Mean and standard error of the per-block mAP differences ``a - b`` (None without blocks): how much of
    a difference in mAP the choice of test canvases alone could make."""
    if len(a) < 2 or len(a) != len(b):
        return None
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5)


def onnx_worker(path: str, images_path: str, out_path: str, drop_value_info: str) -> None:
    """Run the IMX500 file in onnxruntime with the reference kernels, one canvas at a time (its own
    process: onnxruntime aborts the process on some files)."""
    import onnx
    import onnxruntime as ort

    from mct_fx.export_imx500 import reference_session_options

    model = onnx.load(path)
    if drop_value_info == "1":
        del model.graph.value_info[:]
    session = ort.InferenceSession(model.SerializeToString(), reference_session_options(),
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    images = torch.load(images_path, weights_only=True)
    outs = [session.run(None, {feed: images[i:i + 1].numpy()}) for i in range(len(images))]
    torch.save(tuple(torch.cat([torch.from_numpy(o[k]) for o in outs]) for k in range(4)), out_path)


def _onnx_map(name: str, path: str, test, n: int, tmp: str) -> dict:
    """mAP of the IMX500 file run in onnxruntime; when onnxruntime aborts on the file as written, again with
    its ``value_info`` dropped (shapes only: the planner's buffer reuse), and said so."""
    images, out = os.path.join(tmp, "onnx_images.pt"), os.path.join(tmp, "onnx_out.pt")
    torch.save(test.images[:n].clone(), images)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    for drop in ("0", "1"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--onnx-worker", path, images, out, drop],
                              capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            result = _map(name, torch.load(out, weights_only=False), test.targets[:n])
            if drop == "1":
                result["note"] = "onnxruntime aborted on the file as written; run with its value_info dropped"
            return result
        error = [line for line in proc.stderr.splitlines() if "what()" in line or "Error" in line][-1:]
        print(f"onnxruntime failed on {path} (value_info dropped: {drop == '1'}): {error}", flush=True)
    raise RuntimeError(f"onnxruntime cannot run {path}: {error[0][:200] if error else 'aborted'}")


def _convert(path: str, out_dir: str, converter: str | None) -> dict:
    import mct_fx

    try:
        package = mct_fx.convert_imx500(path, out_dir, converter)
    except mct_fx.ConversionError as e:
        return {"converts": False, "error": str(e).splitlines()[0][:200]}
    return {"converts": True, "convert_seconds": package.seconds, "memory": str(package.memory),
            "share": package.memory.share, "zip_bytes": os.path.getsize(package.package)}


def run_detector(name: str, methods: list[str], args) -> dict:
    import train_detection
    from detection_data import mosaics

    model, float_map = train_detection.load(name)
    test = train_detection.test_canvases()
    test.images, test.targets = test.images[:args.n_test], test.targets[:args.n_test]
    calib = mosaics("train", args.n_calib, seed=3).images
    outputs = _outputs(model, test.images)
    result = {"detector": name, "n_test": len(test), "n_calib": len(calib), "gptq_epochs": args.gptq_epochs,
              "float": _map(name, outputs, test.targets), "methods": {}}
    result["float_onnx_subset"] = _map(name, tuple(t[:args.n_onnx] for t in outputs), test.targets[:args.n_onnx])
    with tempfile.TemporaryDirectory() as tmp:
        job = {"detector": name, "state_dict": model.state_dict(), "calib": calib, "test": test.images,
               "gptq_epochs": args.gptq_epochs, "budgets": weight_budgets(model, calib[:1]), "export_dir": tmp}
        job_path = os.path.join(tmp, "job.pt")
        torch.save(job, job_path)
        for method in methods:
            spec = METHODS[method]
            python = sys.executable if spec.peer == "ours" else args.mct_python
            if not python or not os.path.exists(python):
                result["methods"][method] = {"error": "no --mct-python given"}
                continue
            out = os.path.join(tmp, "out.pt")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE,
                                                               os.environ.get("PYTHONPATH", "")]))
            print(f"{name}: {method} ...", flush=True)
            try:
                proc = subprocess.run([python, os.path.abspath(__file__), "--worker", method, job_path, out],
                                      capture_output=True, text=True, env=env, timeout=args.method_timeout)
            except subprocess.TimeoutExpired:
                result["methods"][method] = {"error": f"stopped after {args.method_timeout:.0f} s (--method-timeout)",
                                             "stopped_after": args.method_timeout}
                continue
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                result["methods"][method] = {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
                sys.stderr.write(proc.stderr[-2000:])
                continue
            got = torch.load(out, weights_only=False)
            row = {"bits": spec.bits, "seconds": got["seconds"], "import_seconds": got["import_seconds"],
                   "peak_rss_mb": got["peak_rss_mb"], **_map(name, got["outputs"], test.targets),
                   "block_map": _block_maps(name, got["outputs"], test.targets)}
            if "export" in got:
                exported = got["export"]
                if "path" in exported:
                    exported.update(_convert(exported["path"], os.path.join(tmp, f"{name}_{spec.peer}_imx"),
                                             args.converter))
                    try:
                        exported["onnx"] = _onnx_map(name, exported["path"], test, args.n_onnx, tmp)
                    except Exception as e:  # noqa: BLE001
                        exported["onnx_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    exported["graph_subset"] = _map(name, tuple(t[:args.n_onnx] for t in got["outputs"]),
                                                    test.targets[:args.n_onnx])
                    exported.pop("path")
                row["imx500"] = exported
            result["methods"][method] = row
    return result


# ------------------------------------------------------------------ tables


def table(result: dict) -> str:
    ref = result["float"]
    head = ["method", "bits", "mAP@0.5:0.95", "drop", "mAP@0.5", "drop @0.5", "quantize s", "peak RSS MB",
            "time / MCT", "memory / MCT"]
    rows = [head, ["float", "32", f"{ref['map']:.2f}", "", f"{ref['map_50']:.2f}", "", "", "", "", ""]]
    for name, m in result["methods"].items():
        if "error" in m:
            said = m["error"] if "stopped_after" in m else f"failed: {m['error'][:100]}"
            rows.append([name, "", said] + [""] * (len(head) - 3))
            continue
        row = [name, m["bits"], f"{m['map']:.2f}", f"{m['map'] - ref['map']:+.2f}", f"{m['map_50']:.2f}",
               f"{m['map_50'] - ref['map_50']:+.2f}"]
        row += [f"{m['seconds']:.1f}", f"{m['peak_rss_mb']:.0f}"]
        mct = result["methods"].get(mct_peer(name) if name.startswith("mct_fx") else None, {})
        row += ([f"{m['seconds'] / mct['seconds']:.2f}", f"{m['peak_rss_mb'] / mct['peak_rss_mb']:.2f}"]
                if "seconds" in mct else ["", ""])
        rows.append(row)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
    text = (f"### {result['detector']} ({result['n_calib']} calibration canvases, {result['n_test']} test canvases, "
            f"GPTQ {result['gptq_epochs']} epochs)\n\n" + "\n".join(lines))
    imx = [(n, m["imx500"]) for n, m in result["methods"].items() if "imx500" in m]
    if imx:
        sub = result["float_onnx_subset"]
        head = ["IMX500 file of", "converts", "memory (of the chip)", "export s", "convert s",
                f"ONNX mAP (first {result.get('n_onnx', '')} canvases)", "GraphModule mAP there", "float there"]
        rows = [head]
        for name, e in imx:
            if "error" in e and "converts" not in e:
                rows.append([name, f"export failed: {e['error'][:100]}", "", "", "", "", "", ""])
                continue
            onnx_map = f"{e['onnx']['map']:.2f}" if "onnx" in e else f"failed: {e.get('onnx_error', '')[:80]}"
            if "note" in e.get("onnx", {}):
                onnx_map += f" ({e['onnx']['note']})"
            rows.append([name, "yes" if e.get("converts") else f"no: {e.get('error', '')[:100]}",
                         e.get("memory", ""), f"{e['seconds']:.1f}" if "seconds" in e else "",
                         f"{e.get('convert_seconds', 0):.0f}" if e.get("converts") else "", onnx_map,
                         f"{e['graph_subset']['map']:.2f}", f"{sub['map']:.2f}"])
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
        text += "\n\n" + "\n".join(lines)
    return text


def targets(result: dict) -> list[str]:
    ref, ms = result["float"], result["methods"]
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    def noise(a: dict, b: dict) -> str:
        paired = paired_difference(a.get("block_map", []), b.get("block_map", []))
        if paired is None:
            return ""
        mean, se = paired
        verdict = "within" if abs(mean) <= 2 * se else "outside"
        return (f" (ours - MCT per block of {result['n_test'] // len(a['block_map'])} canvases: {mean:+.2f} "
                f"+- {2 * se:.2f} (2 s.e.), {verdict} the test set's noise)")

    ours, mct = ms.get("mct_fx PTQ", {}), ms.get("MCT PTQ", {})
    if "map" in ours:
        drop = ref["map"] - ours["map"]
        check(drop <= 0.5, f"W8A8 mAP drop {drop:.2f} <= 0.5 points")
        if "map" in mct:
            check(drop <= ref["map"] - mct["map"],
                  f"W8A8 drop {drop:.2f} <= MCT's {ref['map'] - mct['map']:.2f}{noise(ours, mct)}")
            check(ours["seconds"] <= mct["seconds"] / 5,
                  f"PTQ time {ours['seconds']:.1f} s <= MCT's / 5 = {mct['seconds'] / 5:.1f} s")
    gptq = [(name, peer) for name in ("GPTQ W4A8", "OPTQ W4A8") for peer in ("GPTQ W4A8", "GPTQ W4A8 (MCT default)")]
    for name, peer in [*gptq, ("MP 4-bit size", "MP 4-bit size")]:
        a, b = ms.get(f"mct_fx {name}", {}), ms.get(f"MCT {peer}", {})
        if "map" in a and "map" in b:
            check(a["map"] > b["map"], f"{name} drop {ref['map'] - a['map']:.2f} < MCT {peer}'s "
                                       f"{ref['map'] - b['map']:.2f}{noise(a, b)}")
    for name, peer in gptq:
        a, b = ms.get(f"mct_fx {name}", {}), ms.get(f"MCT {peer}", {})
        theirs = b.get("seconds", b.get("stopped_after"))  # a stopped run: a lower bound on its time
        if "seconds" in a and theirs is not None:
            bound = "" if "seconds" in b else " (it was stopped: a lower bound)"
            check(a["seconds"] <= theirs / 10,
                  f"{name} time {a['seconds']:.1f} s <= MCT {peer}'s / 10 = {theirs / 10:.1f} s{bound}")
    e = ours.get("imx500", {})
    if e:
        check(bool(e.get("converts")), f"converts with the NMS on the chip ({e.get('memory') or e.get('error')})")
    return out or ["- nothing to compare"]


def section(result: dict) -> str:
    commands = "\n".join(f"`{c}`" for c in result.get("commands", []))
    return f"{table(result)}\n\nRun by:\n{commands}\n\nTargets:\n" + "\n".join(targets(result))


NOTES = """Reading the rows:
- W4A8 rows keep YOLO's DFL readout (a fixed 1x1 conv with weights 0..15 that reads the expected box
  distances out of the bin softmax) at 8 bits, for both tools: at 4 bits its grid cannot hold 0..15 and
  the boxes collapse (the row `mct_fx GPTQ W4A8 (DFL W4)`). The SSD has no such layer.
- `MCT GPTQ W4A8` runs with MCT's Hessian weighting off, as Ultralytics' IMX export runs it;
  `MCT GPTQ W4A8 (MCT default)` as `get_pytorch_gptq_config(n_epochs)` gives it (Hessian sample-layer
  attention). mct_fx GPTQ runs with its default Hessian weighting on. Any GPTQ that trains its steps end
  to end is bounded below by the float model's forward + backward of those steps.
- The ground truth boxes are real-valued (`detection_data.py`); MCT quantizes the SSD's box-decode output
  on an 8-bit grid (threshold 256: its boxes come out on whole pixels); mct_fx leaves the decode in float
  with 16-bit inputs.
- `mct_fx OPTQ W4A8` is PTQ with `QuantConfig(optq=OPTQConfig())`: one-shot rounding with Hessian error
  feedback (the second moments gathered during calibration), no training; its time / memory ratios are
  to `MCT GPTQ W4A8`.
- Paired differences: ours - MCT's mAP per block of the test canvases, mean +- 2 standard errors."""


SAME_DATA = ("n_test", "n_calib", "n_onnx", "gptq_epochs", "float")


def _earlier_results(out: str) -> dict[str, dict]:
    path = os.path.join(out, "detection.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["detector"]: r for r in json.load(f)["results"]}


def merged(earlier: dict | None, result: dict, command: str) -> dict:
    """``result`` plus the rows of an ``earlier`` run on the same model and data that it did not run again
    (rows in ``METHODS`` order); the commands that made the rows are kept with them."""
    if earlier is None or any(earlier.get(k) != result.get(k) for k in SAME_DATA):
        return {**result, "commands": [command]}
    methods = {**earlier["methods"], **result["methods"]}
    order = list(METHODS)
    methods = dict(sorted(methods.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    return {**result, "methods": methods, "commands": [*earlier.get("commands", []), command]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mct-python", default=os.environ.get("MCT_PYTHON"))
    parser.add_argument("--converter", default=None, help="imxconv-pt (default: mct_fx.convert_imx500's search)")
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--n-onnx", type=int, default=500, help="test canvases the converted files are run on")
    parser.add_argument("--gptq-epochs", type=int, default=5)
    parser.add_argument("--method-timeout", type=float, default=None, help="seconds one method may run")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    methods = chosen_methods(parser, args.methods, METHODS)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; times exclude importing the tool")
    argv = sys.argv[1:]
    shown = [a for i, a in enumerate(argv) if not a.startswith("--mct-python") and not a.startswith("--converter")
             and not (i and argv[i - 1] in ("--mct-python", "--converter"))]
    command = f"python benchmarks/detection.py {shlex.join(shown)}"
    results = _earlier_results(args.out)
    for name in [d.strip() for d in args.detectors.split(",")]:
        result = run_detector(name, methods, args)
        result["n_onnx"] = args.n_onnx
        results[name] = merged(results.get(name), result, command)
        print(section(results[name]) + "\n", flush=True)
        os.makedirs(args.out, exist_ok=True)  # written after each detector: a later failure keeps the earlier
        with open(os.path.join(args.out, "detection.md"), "w") as f:
            f.write("\n\n".join([f"Machine: {machine}.", NOTES, *map(section, results.values())]) + "\n")
        with open(os.path.join(args.out, "detection.json"), "w") as f:
            json.dump({"machine": machine, "results": list(results.values())}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'detection.md')} and detection.json")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "--onnx-worker":
        onnx_worker(*sys.argv[2:])
    else:
        main()
