"""Engine configuration: what a user may set, checked once at the edge.

Everything that sizes the engine (KV pool, batch budgets, context length)
lives here as plain dataclasses so that the scheduler, the KV cache manager
and the model runner are all configured from one validated place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pagedllm.model.attention.selector import check_backend_name

GiB = 1 << 30

DEFAULT_KV_CACHE_MEMORY = 2 * GiB
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")  # fp8 is fp8_e4m3

_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}


def parse_memory(value: int | float | str | None, *, name: str = "kv_cache_memory") -> int:
    """Bytes from an int (bytes), a float (GiB) or a string such as "4GiB" / "512MB".

    A float means GiB because a float number of bytes is never what anyone means,
    while "kv_cache_memory=1.5" reads naturally as 1.5 GiB.
    """
    if value is None:
        return DEFAULT_KV_CACHE_MEMORY
    if isinstance(value, bool):
        raise ValueError(f"{name} must be bytes (int), GiB (float) or a string like '4GiB', got {value!r}")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, float):
        nbytes = int(value * GiB)
    elif isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if not m:
            raise ValueError(f"{name} must look like '4GiB', '512MiB' or a number of bytes, got {value!r}")
        number, unit = m.group(1), (m.group(2) or "").lower()
        nbytes = int(float(number) * _UNITS[unit[:1] if unit != "b" else "b"])
    else:
        raise ValueError(f"{name} must be bytes (int), GiB (float) or a string like '4GiB', got {value!r}")
    if nbytes <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    return nbytes


@dataclass
class EngineConfig:
    """All engine options, with vLLM's names where vLLM has them."""

    model: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    revision: str | None = None
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    load_format: str = "auto"  # "auto" (real weights) or "dummy" (random weights)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the model's context length
    block_size: int = 16
    kv_cache_memory: int | float | str | None = None  # bytes, GiB (float) or "4GiB"; None: 2 GiB on the CPU, profiled on CUDA
    num_kv_blocks: int | None = None  # overrides kv_cache_memory; for tests and experiments
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # Sliding-window layers keep every block, in one KV cache group with the others, as if they attended
    # to everything (vLLM's flag): outputs are the same, memory is not; for comparisons and debugging.
    disable_hybrid_kv_cache_manager: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    # The engine core (scheduler, KV cache, model) runs in a process of its own, so that
    # no frontend work (HTTP, detokenizing) shares its interpreter; False runs it in the
    # caller's process (debugging, tests that reach into the core).
    core_process: bool = True
    # --- GPU (on the CPU only attention_backend applies) ---
    attention_backend: str = "auto"  # auto (triton on CUDA, native kernels on the CPU) | torch | cpu | triton
    # The KV cache's element type: auto (the model's dtype), int8 (CPU and CUDA) or fp8 (CUDA): one byte per
    # element and a float16 scale per token and KV head, about twice the tokens in the same kv_cache_memory.
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory for weights, activations and the KV pool
    enforce_eager: bool = False  # never replay CUDA graphs for decode steps

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        # Up to a whole context: `pagedllm bench memory` models a contiguous allocator with block_size = max_model_len.
        _check_int("block_size", self.block_size, 1, 1 << 16)
        _check_int("max_num_seqs", self.max_num_seqs, 1, 1 << 20)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2, 1 << 24)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1, 1 << 30)
        self.kv_cache_bytes = parse_memory(self.kv_cache_memory)
        check_backend_name(self.attention_backend)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")
        for name in ("enforce_eager", "core_process", "enable_prefix_caching", "trust_remote_code",
                     "disable_hybrid_kv_cache_manager"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("seed", self.seed, -(1 << 63), (1 << 64) - 1)

    @property
    def kv_cache_size_given(self) -> bool:
        """True when the user sized the KV pool; otherwise a GPU sizes it from gpu_memory_utilization."""
        return self.num_kv_blocks is not None or self.kv_cache_memory is not None


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
