"""How many KV blocks fit on a GPU: measure what the largest step needs, give the rest to the cache.

Weights are loaded first; then one forward pass (and the sampler) at the
largest step the scheduler can ask for, max_num_batched_tokens, shows the
activation peak. Of gpu_memory_utilization x the GPU's memory, whatever that
peak leaves becomes KV blocks. Everything else on the device counts against
the budget too (the CUDA context, other processes), so the engine never takes
memory that is not free. Measuring beats estimating: the peak depends on the
attention backend, the matmul kernels and the caching allocator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import SamplingRow

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class MemoryProfile:
    total: int  # bytes on the device
    budget: int  # gpu_memory_utilization * total
    peak: int  # bytes in use at the profiled step's peak: torch's peak allocation + all memory torch does not hold
    kv_bytes: int  # budget - peak; <= 0 when nothing is left

    def describe(self, utilization: float) -> str:
        return (f"gpu_memory_utilization={utilization:g} of {self.total / GiB:.2f} GiB allows {self.budget / GiB:.2f} GiB; "
                f"weights and the largest step peak at {self.peak / GiB:.2f} GiB (CUDA context and other processes included)")


def kv_cache_budget(total: int, free: int, reserved: int, peak_allocated: int, utilization: float) -> MemoryProfile:
    """The arithmetic, apart from the device so that it can be tested anywhere.

    total/free: torch.cuda.mem_get_info() after the profiled step; reserved:
    what torch's caching allocator holds then; peak_allocated: its peak.
    Memory in use that torch does not hold (total - free - reserved) is the
    CUDA context, library workspaces and other processes.
    """
    peak = (total - free - reserved) + peak_allocated
    budget = int(utilization * total)
    return MemoryProfile(total, budget, peak, budget - peak)


def dummy_prefill(num_tokens: int, num_seqs: int, max_model_len: int, block_size: int, device: torch.device):
    """input_ids, positions and AttentionMetadata for num_tokens prompt tokens spread over num_seqs sequences.

    Every block table entry is block 0 and every slot lies in it, so a
    one-block pool serves: the shapes, and so the memory, are those of a real
    step; the values are garbage, which nobody reads.
    """
    num_seqs = max(1, min(num_seqs, num_tokens))
    num_tokens = min(num_tokens, num_seqs * max_model_len)
    lens = sorted(num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs))  # 1-token ones first
    positions = [p for n in lens for p in range(n)]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    max_blocks = -(-lens[-1] // block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([p % block_size for p in positions], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device),
        num_decodes=sum(1 for n in lens if n == 1),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
        max_seq_len=lens[-1],
        max_query_len=lens[-1],
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    return input_ids, torch.tensor(positions, dtype=torch.int64, device=device), meta


@torch.inference_mode()
def profile_step(runner, num_tokens: int, num_seqs: int, max_model_len: int) -> None:
    """One forward pass, logits and sampling at the largest step, over a one-block dummy KV pool."""
    runner.allocate_kv_cache(1)
    input_ids, positions, meta = dummy_prefill(num_tokens, num_seqs, max_model_len, runner.block_size, runner.device)
    hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
    last = torch.tensor(meta.query_start_loc_cpu[1:], device=runner.device) - 1
    logits = runner.model.compute_logits(hidden[last])
    del hidden
    params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.1, logprobs=1)  # the sampler's costliest path
    runner.sampler(logits, [SamplingRow(params, [0], [], None, ()) for _ in range(logits.shape[0])])
    runner.kv_caches = runner._kv_tensors = []


def profile_kv_cache_bytes(runner, utilization: float, num_tokens: int, num_seqs: int, max_model_len: int) -> MemoryProfile:
    """Run the profiled step on the runner's GPU and work out the KV budget."""
    dev = runner.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    profile_step(runner, num_tokens, num_seqs, max_model_len)
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    profile = kv_cache_budget(total, free, torch.cuda.memory_reserved(dev), torch.cuda.max_memory_allocated(dev), utilization)
    torch.cuda.empty_cache()  # hand the step's cached blocks back, so the KV pool can be one allocation
    return profile


def gpu_kv_blocks(runner, config, max_model_len: int) -> int:
    """KV blocks for the pool on a GPU, from config.gpu_memory_utilization; logs the sums, raises if none fit."""
    u = config.gpu_memory_utilization
    profile = profile_kv_cache_bytes(runner, u, config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
    num_blocks = max(profile.kv_bytes, 0) // runner.bytes_per_block()
    if num_blocks == 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: {profile.describe(u)}. Raise gpu_memory_utilization, "
            f"lower max_num_batched_tokens ({config.max_num_batched_tokens}), or free the GPU")
    logger.info("KV cache: %s; %.2f GiB left = %d blocks = %d tokens",
                profile.describe(u), profile.kv_bytes / GiB, num_blocks, num_blocks * runner.block_size)
    return num_blocks
