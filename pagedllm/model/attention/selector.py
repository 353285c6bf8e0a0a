"""Which paged-attention backend runs on a device.

All backends share TorchPagedAttention's constructor and
forward(q, k, v, kv_cache, meta). "auto" picks the fastest one that works
here: the Triton kernels on CUDA where triton imports, the native CPU kernels
on the CPU where a C++ compiler built them, and the torch reference otherwise.
Backends are imported only when chosen: importing pagedllm never needs triton.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")


def check_backend_name(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")


def _triton_backend() -> type:
    try:
        from pagedllm.model.attention.triton_backend import TritonPagedAttention
    except ImportError as exc:
        raise ValueError(f"the triton attention backend needs the triton package, which could not be imported ({exc}); "
                         "install triton or use attention_backend='torch'") from exc
    return TritonPagedAttention


def get_attention_backend(device_type: str, name: str | None = None) -> type:
    name = name or "auto"
    check_backend_name(name)
    if name == "auto" and device_type == "cuda":
        try:
            return _triton_backend()
        except ValueError as exc:
            logger.warning("%s; falling back to the torch backend (no CUDA graphs)", exc)
            name = "torch"
    if name == "auto":
        from pagedllm.model.attention.cpu_backend import CpuPagedAttention

        name = "cpu" if device_type == "cpu" and CpuPagedAttention.available() else "torch"
    if name == "torch":
        from pagedllm.model.attention.torch_backend import TorchPagedAttention

        return TorchPagedAttention
    if name == "cpu":
        from pagedllm.model.attention.cpu_backend import CpuPagedAttention

        if device_type != "cpu" or not CpuPagedAttention.available():
            raise ValueError("the cpu attention backend needs device='cpu' and a C++ compiler (g++) to build its kernels; "
                             "use attention_backend='torch'")
        return CpuPagedAttention
    return _triton_backend()
