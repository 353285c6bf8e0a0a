"""What this CPU can do, read once from /proc/cpuinfo."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of the first CPU (avx512_bf16, amx_bf16, ...); empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (avx512_bf16 or AMX): bf16 matmuls run several times faster
    than fp32 there, and several times slower elsewhere, where oneDNN emulates them (docs/cpu-performance.md)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def onednn_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls at all (natively or emulated): it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT.
    Elsewhere (e.g. AMD Zen 3) a bf16 layer must compute in float32."""
    flags = cpu_flags()
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
