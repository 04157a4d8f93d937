"""Run the same PTQ job with mct_fx and with Sony's MCT (in its own venv), for side-by-side tables.

MCT (``model-compression-toolkit``) needs its own environment; point
``--mct-python`` (or ``MCT_PYTHON``) at that venv's python.  Each tool runs in a
worker process (``python benchmarks/peers.py --worker TOOL ...``) that writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def quantize_with(tool: str, model, calib):
    """Quantize ``model`` on ``calib`` (a list of batches) for IMX500 with ``tool``; returns (qmodel, seconds)."""
    if tool == "mct_fx":
        import mct_fx

        t0 = time.perf_counter()
        q = mct_fx.quantize(model, calib, "imx500", verbose=False)
        return q, time.perf_counter() - t0
    import model_compression_toolkit as mct

    tpc = mct.get_target_platform_capabilities(tpc_version="1.0", device_type="imx500")

    def gen():
        for x in calib:
            yield [x]

    t0 = time.perf_counter()
    q, _ = mct.ptq.pytorch_post_training_quantization(model, gen, target_platform_capabilities=tpc)
    return q, time.perf_counter() - t0


def run_worker(tool: str, job: str, args: list[str], python: str | None = None) -> dict | None:
    """Run ``job`` (a module in benchmarks/ with a ``work(tool, *args) -> dict``) in a fresh process."""
    if tool == "mct" and not (python and os.path.exists(python)):
        return None  # no MCT venv given: MCT's rows are left out (our venv has no MCT to run)
    python = python or sys.executable
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python, os.path.abspath(__file__), "--worker", tool, job, out, *args]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "--worker":
    tool, job, out, rest = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    module = __import__(job)
    with open(out, "w") as f:
        json.dump(module.work(tool, *rest), f)
