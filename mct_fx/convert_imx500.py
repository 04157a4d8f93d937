"""Run Sony's IMX500 converter (``imxconv-pt``) on a file from :func:`mct_fx.export_imx500`.

The converter (PyPI ``imx500-converter[pt]``, a Python front end over a Java 17
backend) turns MCTQ ONNX into ``packerOut.zip``, what the camera's packager
takes, and reports how much of the chip's 8 MB memory the network uses.  Its
pins (onnx, protobuf, mct-quantizers) clash with mct-fx's, so it lives in a venv
of its own; ``nox -s imx500`` builds one at ``.nox/imx500``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["convert_imx500", "Imx500Package", "MemoryReport", "ConversionError", "find_converter"]

INSTALL = ("python3 -m venv imx500-venv && imx500-venv/bin/pip install 'imx500-converter[pt]' "
           "(its own venv: its pins clash with mct-fx's; `nox -s imx500` builds .nox/imx500)")
JAVA_INSTALL = "apt-get install -y openjdk-17-jre-headless"
_NOX_VENV = Path(".nox") / "imx500" / "bin" / "imxconv-pt"


class ConversionError(RuntimeError):
    """The converter is missing, or it refused the file (the message carries its own error line)."""


@dataclass(frozen=True)
class MemoryReport:
    """The converter's memory report: what the network needs of the chip's memory."""

    fits: bool
    used_bytes: int
    available_bytes: int
    runtime_bytes: int  # activations and buffers while running
    model_bytes: int  # weights and code

    @property
    def share(self) -> float:
        """Fraction of the chip's memory the network uses."""
        return self.used_bytes / self.available_bytes

    def __str__(self) -> str:
        return (f"{self.used_bytes / 2**20:.2f} MB of {self.available_bytes / 2**20:.0f} MB "
                f"({100 * self.share:.1f}%), {'fits' if self.fits else 'does not fit'} in the chip")


@dataclass(frozen=True)
class Imx500Package:
    """What the converter wrote: ``packerOut.zip`` and its report; its log next to them."""

    package: Path
    memory: MemoryReport
    seconds: float
    log: Path


def find_converter(converter: str | os.PathLike | None = None) -> Path:
    """``converter`` if given, else ``$IMXCONV_PT``, ``imxconv-pt`` on PATH, or ``.nox/imx500/bin/imxconv-pt``."""
    candidates = [converter] if converter is not None else [
        os.environ.get("IMXCONV_PT"), shutil.which("imxconv-pt"), _NOX_VENV if _NOX_VENV.exists() else None]
    for c in candidates:
        if c is not None and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    where = f"{converter} is not an executable file" if converter is not None else "imxconv-pt was not found"
    raise ConversionError(f"{where}: install the IMX500 converter with {INSTALL}, then pass its imxconv-pt "
                          "(converter=...) or put it on PATH")


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").exists() else shutil.which("java")
    if java is None:
        raise ConversionError(f"the IMX500 converter needs Java 17, and no java was found: {JAVA_INSTALL}")
    return java


def _error_lines(log: str) -> list[str]:
    """The converter's own error lines, the most specific first, without timestamps and duplicates."""
    found: list[str] = []
    for line in log.splitlines():
        m = re.search(r"\bERROR\s*:?\s*(?:CODE:\s*)?(.*)", line)
        if m is None or line.lstrip().startswith("at ") or "Exception in thread" in line:
            continue
        text = re.sub(r"\s*\[/[^\]]*\]\s*$", "", m.group(1)).strip()  # the Python logger's source location
        if text and text not in found and not text.startswith("[FEFSUC]") and "exited with error code" not in text:
            found.append(text)
    return found


def _bytes(value: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?B)\s*", value)
    if m is None:
        raise ConversionError(f"unreadable size {value!r} in the converter's memory report")
    return round(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)])


def read_memory_report(path: Path) -> MemoryReport:
    """Parse ``<model>_MemoryReport.json``."""
    report = json.loads(path.read_text())["Memory Report"]
    return MemoryReport(fits=bool(report["Fit In Chip"]), used_bytes=_bytes(report["Memory Usage"]),
                        available_bytes=_bytes(report["Total Memory Available On Chip"]),
                        runtime_bytes=_bytes(report["Runtime Memory Physical Size"]),
                        model_bytes=_bytes(report["Model Memory Physical Size"]))


def convert_imx500(onnx_path: str | os.PathLike, out_dir: str | os.PathLike,
                   converter: str | os.PathLike | None = None, *, timeout: float | None = 1800) -> Imx500Package:
    """Convert ``onnx_path`` (from :func:`mct_fx.export_imx500`) into ``out_dir/packerOut.zip``.

    ``converter``: the ``imxconv-pt`` to run (default: see :func:`find_converter`).
    Raises :class:`ConversionError` with the install commands when the converter or
    Java is missing, and with the converter's own error line when it refuses the file
    (its whole output is kept in ``out_dir/imxconv.log``).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ConversionError(f"{onnx_path} does not exist")
    exe = find_converter(converter)
    java = _java()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(java).parent), str(exe.parent), env.get("PATH", "")])
    command = [str(exe), "-i", str(onnx_path), "-o", str(out_dir), "--overwrite-output", "--report-size-unit", "B"]
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise ConversionError(f"imxconv-pt did not finish within {timeout:g} s on {onnx_path}") from e
    seconds = time.time() - start
    log = out_dir / "imxconv.log"
    log.write_text(done.stdout + done.stderr)
    package = out_dir / "packerOut.zip"
    if done.returncode != 0 or not package.exists():
        errors = _error_lines(done.stdout + done.stderr) or [f"exit status {done.returncode}"]
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ConversionError(f"imxconv-pt refused {onnx_path}: {'; '.join(errors[:3])}{more}; full log: {log}")
    report = out_dir / f"{onnx_path.stem}_MemoryReport.json"
    if not report.exists():
        raise ConversionError(f"imxconv-pt wrote no memory report ({report}); full log: {log}")
    return Imx500Package(package, read_memory_report(report), seconds, log)
