"""Build and load the fused kernels (JIT, once, cached).

The sources in ``mct_fx/csrc/`` are compiled with ``torch.utils.cpp_extension.load``
on first import and cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later imports
load the cached library in milliseconds, and a changed source gets a new name
(a hash of the sources), hence a fresh build.  The libraries only register kernels
for ops that ``mct_fx.kernels`` defines (``TORCH_LIBRARY_IMPL``), built with
``is_python_module=False`` (no pybind: seconds, not half a minute).  The CUDA
kernels are built only when a GPU is visible (or ``MCT_FX_BUILD_CUDA=1``, to
compile-check without one).  A failed build warns once and leaves the pure-torch
reference in place for that device; ``MCT_FX_KERNELS=reference`` skips building.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import warnings

__all__ = ["load_kernels", "CSRC", "cuda_build_env"]

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
_CUDA_FLAGS = ("-O3", "--fmad=false")  # IEEE division by default; no fused multiply-add: bit-equal to the reference


def _name(kind: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(_CFLAGS + _CUDA_FLAGS).encode())
    return f"mct_fx_{kind}_{digest.hexdigest()[:12]}"


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``, the usual places, or where the real ``nvcc`` lives
    (``/usr/local/bin/nvcc`` may be a wrapper script whose prefix is not a toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def cuda_build_env() -> tuple[dict[str, str], list[str]]:
    """Environment and include folders a CUDA extension build needs on these machines."""
    import torch

    env = {}
    home = _find_cuda_home()
    if home:
        env["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # without a visible GPU, torch's architecture detection fails: name one
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    # headers of the pip-installed CUDA libraries (the system toolkit may lack some, e.g. cusparse.h)
    includes = []
    for site in sys.path:
        includes += [d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d)]
    return env, sorted(set(includes))


def _build(kind: str, sources: list[str], cuda: bool) -> None:
    import logging

    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    level, quiet.level = quiet.level, logging.ERROR
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    kwargs = {}
    if cuda:
        env, includes = cuda_build_env()
        os.environ.update(env)
        cpp_extension.CUDA_HOME = env.get("CUDA_HOME", cpp_extension.CUDA_HOME)
        kwargs = {"extra_cuda_cflags": list(_CUDA_FLAGS), "extra_include_paths": includes}
    cpp_extension.load(name=_name(kind), sources=[os.path.join(CSRC, s) for s in sources],
                       extra_cflags=list(_CFLAGS), is_python_module=False,
                       verbose=os.environ.get("MCT_FX_KERNELS_VERBOSE") == "1", **kwargs)


def _try(kind: str, sources: list[str], cuda: bool) -> bool:
    try:
        _build(kind, sources, cuda)
        return True
    except Exception as e:  # noqa: BLE001 - any build problem means: use the reference
        warnings.warn(f"mct_fx: could not build the fused {kind} kernels ({type(e).__name__}: {str(e)[:300]}); "
                      "using the pure-torch reference there (MCT_FX_KERNELS=reference skips the build)",
                      RuntimeWarning, stacklevel=4)
        return False


def load_kernels() -> str:
    """Load (building if needed) the kernels; returns the backend: "cpp", "cpp+cuda", "cuda" or "reference"."""
    if os.environ.get("MCT_FX_KERNELS", "").lower() == "reference":
        return "reference"
    import torch

    parts = []
    if _try("cpu", ["fake_quant_cpu.cpp", "search_cpu.cpp", "autograd.cpp"], cuda=False):
        parts.append("cpp")
    if (torch.cuda.is_available() or os.environ.get("MCT_FX_BUILD_CUDA") == "1") and \
            _try("cuda", ["fake_quant_cuda.cu"], cuda=True):
        parts.append("cuda")
    return "+".join(parts) or "reference"
