"""Which paged-attention backend runs on a device.

All backends share TorchPagedAttention's constructor and
forward(q, k, v, kv_cache, meta). "auto" picks the fastest one that works
here: the Triton kernels on CUDA, the native CPU kernels on the CPU where a
C++ compiler built them, and the torch reference otherwise.
"""

from __future__ import annotations

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")


def check_backend_name(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")


def get_attention_backend(device_type: str, name: str | None = None) -> type:
    name = name or "auto"
    check_backend_name(name)
    if name == "auto":
        if device_type == "cuda":
            name = "triton"
        else:
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
    try:
        from pagedllm.model.attention.triton_backend import TritonPagedAttention
    except ImportError as exc:
        raise ValueError(f"the triton attention backend is not available here ({exc}); use attention_backend='torch'") from exc
    return TritonPagedAttention
