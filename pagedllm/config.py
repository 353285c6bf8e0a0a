"""Engine configuration: what a user may set, checked once at the edge.

Everything that sizes the engine (KV pool, batch budgets, context length)
lives here as plain dataclasses so that the scheduler, the KV cache manager
and the model runner are all configured from one validated place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from pagedllm.model.attention.selector import ATTENTION_BACKENDS
from pagedllm.sampling_params import MAX_LOGPROBS

GiB = 1 << 30

DEFAULT_KV_CACHE_MEMORY = 2 * GiB
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")  # fp8 is fp8_e4m3
# Every name --dtype accepts (vLLM's and torch's short ones too), to the torch dtype it names. Strings, so
# that the config imports no torch; the model runner looks them up as getattr(torch, DTYPES[name]).
DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}

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


def option(default: object, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True):
    """An EngineConfig field with its help text and choices, from which args.py makes its flag.

    cli=False keeps a field off the command line (set from Python only). Choices are
    also what __post_init__ checks, so a name is accepted or refused the same way
    from the CLI and from Python.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass
class EngineConfig:
    """All engine options, with vLLM's names where vLLM has them."""

    model: str | None = option(None, "HF directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    revision: str | None = option(None, "the model's revision on the hub: a branch, tag or commit")
    tokenizer: str | None = option(None, "HF directory or hub id of the tokenizer (default: the model's own)")
    load_format: str = option("auto", "auto: the model's weights; dummy: random weights of the same shapes",
                              choices=("auto", "dummy"))
    dtype: str = option("auto", "the weights' and activations' type (default: bfloat16 where the device computes it "
                                "natively, else float32 on the CPU and float16 on CUDA)", choices=("auto", *DTYPES))
    device: str = option("auto", "where the model runs (default: cuda when torch sees a GPU, else cpu)",
                         choices=("auto", "cpu", "cuda"))
    max_model_len: int | None = option(None, "longest sequence, prompt and output together (default: the model's context length)")
    block_size: int = option(16, "tokens per KV cache block")
    kv_cache_memory: int | float | str | None = option(
        None, "KV pool size: bytes, or e.g. 2GiB (default: 2GiB on the CPU; on CUDA what --gpu-memory-utilization leaves)")
    num_kv_blocks: int | None = option(None, "the KV pool in blocks; overrides kv_cache_memory (tests and experiments)",
                                       cli=False)
    max_num_seqs: int = option(256, "most requests running in one step")
    max_num_batched_tokens: int = option(2048, "most tokens computed in one step; longer prompts are prefilled in chunks")
    enable_prefix_caching: bool = option(True, "share the KV blocks of common prompt prefixes between requests (default: on)")
    # vLLM's flag: one KV cache group for all layers, as if sliding-window layers attended to everything.
    disable_hybrid_kv_cache_manager: bool = option(
        False, "sliding-window layers keep every KV block, as full-attention layers do (same outputs, more memory; "
               "for comparisons and debugging)")
    seed: int = option(0, "seed of the random weights of --load-format dummy")
    max_logprobs: int = option(MAX_LOGPROBS, "most top logprobs a request may ask for per token (logprobs, top_logprobs, "
                                             "prompt_logprobs); -1: no limit. -1 in a request asks for the whole "
                                             "vocabulary, where this allows that many")
    trust_remote_code: bool = option(False, "let the tokenizer run code from its hub repository", cli=False)
    # In a process of its own, no frontend work (HTTP, detokenizing) shares the core's interpreter;
    # False also serves tests that reach into the core.
    core_process: bool = option(True, "run the engine core (scheduler, KV cache, model) in a process of its own "
                                      "(default: on); --no-core-process runs it in this one, for debugging")
    # --- more than one process (worker/parallel.py) ---
    tensor_parallel_size: int = option(1, "split each layer across this many worker processes, one per rank, on "
                                          "torch.distributed (gloo on the CPU, NCCL on CUDA)")
    distributed_init_method: str | None = option(
        None, "where the tensor-parallel ranks meet: tcp://HOST:PORT of this host, or env:// (MASTER_ADDR, MASTER_PORT); "
              "default: env:// where MASTER_ADDR is set, else a free port on 127.0.0.1 (docs/parallel.md)")
    distributed_workers: str = option(
        "spawn", "spawn: this engine starts tensor-parallel ranks 1..N-1 on this host; external: they are started apart, "
                 "on this host or others, with python -m pagedllm.worker.tp_worker (docs/parallel.md)",
        choices=("spawn", "external"))
    cpu_bind: bool = option(False, "CPU, tensor_parallel_size > 1: bind each rank on a host to its own share of the "
                                   "cores, in order (rank r of n: the r-th n-th), e.g. one NUMA node each")
    data_parallel_size: int = option(1, "this many engine cores, each with its own KV pool, behind one frontend "
                                        "(a request goes to the core holding its longest cached prefix, else the "
                                        "least loaded one)")
    # --- GPU (on the CPU only attention_backend applies) ---
    attention_backend: str = option("auto", "paged attention kernels (default: triton on CUDA, native kernels on the CPU, "
                                            "torch where they cannot be built)", choices=ATTENTION_BACKENDS)
    # Quantized: one byte per element and a float16 scale per token and KV head.
    kv_cache_dtype: str = option("auto", "KV cache elements: auto (the model's dtype), int8 (CPU and CUDA) or fp8 (CUDA); "
                                         "a quantized cache holds about twice the tokens in the same --kv-cache-memory",
                                 choices=KV_CACHE_DTYPES)
    gpu_memory_utilization: float = option(
        0.9, "CUDA: share of GPU memory for weights, activations and the KV pool, in (0, 1] (default 0.9); "
             "the KV pool gets what a profiled step leaves, unless --kv-cache-memory is given")
    enforce_eager: bool = option(False, "CUDA: run decode steps eagerly, without CUDA graphs")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        # Up to a whole context: `pagedllm bench memory` models a contiguous allocator with block_size = max_model_len.
        _check_int("block_size", self.block_size, 1, 1 << 16)
        _check_int("max_num_seqs", self.max_num_seqs, 1, 1 << 20)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1, 1 << 10)
        _check_int("data_parallel_size", self.data_parallel_size, 1, 1 << 10)
        _check_int("max_logprobs", self.max_logprobs, -1, 1 << 24)
        init = self.distributed_init_method
        if init is not None and not (isinstance(init, str) and re.match(r"^(tcp://[^:/]+:\d+|env://)$", init)):
            raise ValueError(f"distributed_init_method must be tcp://HOST:PORT or env://, got {init!r}")
        if self.data_parallel_size > 1 and self.tensor_parallel_size > 1 and (
                init is not None or self.distributed_workers == "external"):
            raise ValueError("data_parallel_size > 1 with tensor_parallel_size > 1 gives each core its own group of ranks "
                             "on this host: leave distributed_init_method unset and distributed_workers 'spawn' "
                             "(each group takes its own free port)")
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 2, 1 << 24)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1, 1 << 30)
        self.kv_cache_bytes = parse_memory(self.kv_cache_memory)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")
        for f in fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
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
