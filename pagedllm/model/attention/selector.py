"""Which paged-attention backend runs on a device.

STAND-IN from the `cuda` branch: the `triton` branch owns the real selector
and replaces this file when both are merged. The contract both sides code
against: get_attention_backend(device_type, name=None) returns a class with
TorchPagedAttention's constructor and forward(q, k, v, kv_cache, meta);
"auto" (or None) means triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def get_attention_backend(device_type: str, name: str | None = None) -> type:
    name = name or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    if name == "torch":
        from pagedllm.model.attention.torch_backend import TorchPagedAttention

        return TorchPagedAttention
    try:
        from pagedllm.model.attention.triton_backend import TritonPagedAttention
    except ImportError as exc:
        raise ValueError(f"the triton attention backend is not available here ({exc}); "
                         f"use attention_backend='torch'") from exc
    return TritonPagedAttention
