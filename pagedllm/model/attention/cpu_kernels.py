"""Native CPU attention kernels: compiled once with the system C++ compiler, loaded with ctypes.

The kernels are plain C++ with no torch headers, so a build takes about a
second (a torch extension takes a minute) and needs only `g++`. They are
compiled for this CPU (-march=native) and cached by a hash of the source,
the compiler and the CPU's flags under the pagedllm cache directory. They use
OpenMP through `libgomp.so.1`, which resolves to the copy torch has already
loaded, so both share one thread pool rather than fighting over the cores.

Where no compiler is found or the build fails, `load()` returns None and the
torch backend is used: slower, never wrong.
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

import torch

from pagedllm.model.cache import cache_root
from pagedllm.model.cpu_info import cpu_flags

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# -ffast-math lets the compiler vectorise the reductions and exp (glibc's libmvec). It is
# given to the compile step only: linked with it, the library would pull in crtfastmath,
# which switches on flush-to-zero for the whole process when loaded and so changes
# what every other float operation computes.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]
_ENTRY_POINTS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    flags = " ".join(_COMPILE_FLAGS + _LINK_FLAGS)
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), version, flags, platform.machine(), " ".join(sorted(cpu_flags()))]).encode()).hexdigest()[:16]
    target = Path(cache_root()) / "kernels" / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp[: -len(".so")] + ".o"
    try:
        subprocess.run([compiler, *_COMPILE_FLAGS, "-c", "-o", obj, str(_SOURCE)], capture_output=True, text=True, check=True)
        subprocess.run([compiler, "-o", tmp, obj, *_LINK_FLAGS], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    logger.info("compiled CPU attention kernels: %s", target)
    return target


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built here."""
    if os.environ.get("PAGEDLLM_NO_CPU_KERNELS"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: CPU attention falls back to the slower torch backend")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("CPU attention kernels did not build (%s): falling back to the torch backend", detail.strip()[:500])
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name in _ENTRY_POINTS.values():
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32]
        fn.restype = None
    return lib


def supports(dtype: torch.dtype) -> bool:
    return dtype in _ENTRY_POINTS and load() is not None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached keys/values, read through its block table.

    q [B, heads, head_dim]; kv_cache [2, blocks, block_size, kv_heads, head_dim];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (0 = a padding row,
    whose output is zeros). Returns [B, heads, head_dim] in q's dtype.
    """
    lib = load()
    fn = getattr(lib, _ENTRY_POINTS[q.dtype])
    q = q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    lens = seq_lens.contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.is_contiguous() and kv_cache.dtype == q.dtype and tables.dtype == torch.int32 and lens.dtype == torch.int32
    out = torch.empty_like(q)
    fn(q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
       out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale)
    return out
