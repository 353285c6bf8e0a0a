"""Native CPU kernels: plain C++ compiled once with the system compiler, loaded with ctypes.

The sources include no torch headers, so a build takes about a second (a
torch extension takes a minute) and needs only `g++`. Each library is
compiled for this CPU (-march=native) and cached under the pagedllm cache
directory by a hash of its source, the compiler and the CPU's flags. The
kernels use OpenMP through `libgomp.so.1`, which resolves to the copy torch
has already loaded, so both share one thread pool rather than fighting over
the cores.

Each library is one source, csrc/<name>.cpp; signatures.py holds the C
signature of every function they export, which `load` sets before returning
the library. Where no compiler is found or a build fails, `load` returns None
(with one warning) and callers keep to their torch code: slower, never wrong.
`PAGEDLLM_NO_CPU_KERNELS=1` turns every native kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from pagedllm.file_cache import cache_root
from pagedllm.kernels.cpu.cpu_info import cpu_flags
from pagedllm.kernels.cpu.signatures import LIBRARIES

logger = logging.getLogger(__name__)

_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17"]
# -ffast-math lets the compiler vectorise the reductions and exp (glibc's libmvec), but
# it also turns divisions into reciprocal estimates: sources that must round as torch
# does go without it. It is given to the compile step only: linked with it, the library
# would pull in crtfastmath, which switches on flush-to-zero for the whole process when
# loaded and so changes what every other float operation computes.
_FAST_MATH = "-ffast-math"
# Without -ffast-math, no FMA contraction either: a * b + c rounds twice, as torch's
# element-wise ops do (GCC fuses it by default). Explicit FMA intrinsics stay FMAs.
_NO_CONTRACT = "-ffp-contract=off"
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]
_CSRC = Path(__file__).with_name("csrc")
# The headers the sources share (bf16.h, kv_int8.h).
_HEADERS = sorted(_CSRC.glob("*.h"))


@lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout


def _build(compiler: str, source: Path, fast_math: bool) -> Path:
    version = _compiler_version(compiler)
    compile_flags = _COMPILE_FLAGS + ([_FAST_MATH] if fast_math else [_NO_CONTRACT])
    flags = " ".join(compile_flags + _LINK_FLAGS)
    # Any header of csrc/ may be included by it: a change to one rebuilds it too.
    texts = [source.read_text()] + [h.read_text() for h in _HEADERS]
    key = hashlib.sha256("\0".join([*texts, version, flags, platform.machine(), " ".join(sorted(cpu_flags()))]).encode()).hexdigest()[:16]
    target = Path(cache_root()) / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp[: -len(".so")] + ".o"
    try:
        subprocess.run([compiler, *compile_flags, "-c", "-o", obj, str(source)], capture_output=True, text=True, check=True)
        subprocess.run([compiler, "-o", tmp, obj, *_LINK_FLAGS], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    logger.info("compiled CPU kernels: %s", target)
    return target


@lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The library built from csrc/<name>.cpp with its functions' signatures set (signatures.py), or None where it
    cannot be built here."""
    spec = LIBRARIES[name]
    lib = _load_source(_CSRC / f"{name}.cpp", spec.fast_math)
    if lib is None:
        return None
    for fn_name, (argtypes, restype) in spec.functions.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _load_source(source: Path, fast_math: bool) -> ctypes.CDLL | None:
    if os.environ.get("PAGEDLLM_NO_CPU_KERNELS"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: the CPU runs on torch ops alone, which is slower")
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source, fast_math)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("CPU kernels %s did not build (%s): falling back to torch ops", source.name, detail.strip()[:500])
        return None
