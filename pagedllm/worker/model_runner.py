"""SchedulerOutput -> flat tensors -> model -> sampler.

The runner owns everything with a tensor in it: the model, the KV pool (one
tensor per layer, allocated once), and per-request sampling generators.
"""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass, field

import torch

from pagedllm.config import DTYPES
from pagedllm.model.arch_config import ArchConfig
from pagedllm.kernels.cpu.cpu_info import native_bf16
from pagedllm.model.attention import kv_quant
from pagedllm.model.attention.metadata import AttentionMetadata, common_prefix_blocks
from pagedllm.model.attention.torch_backend import TorchPagedAttention
from pagedllm.model.models.registry import model_class
from pagedllm.worker.kv_cache_groups import KVCacheGroup, kv_cache_groups, slot_of_layers
from pagedllm.worker.sampler import Sampler, SamplingRow, TokenLogprobs, gather_logprobs

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, DTYPES[name])
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor; on the CPU from anonymous mmap, which the kernel zero-fills page by page on first touch.

    Zeroing a multi-GiB KV pool with memset would add seconds to every start;
    mmap'd pages cost nothing until a block is first written. The pool must
    read as zeros (not garbage) because padded slots are multiplied by zero
    attention weights, and 0 * NaN would still be NaN.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=dtype, count=torch.Size(shape).numel()).view(shape)


@dataclass
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class RunnerOutput:
    """One step's results: a token (or the exception that ended its row) for every sequence that samples,
    and the prompt logprobs of the prompt positions computed this step, by request id, for requests asking for them."""

    sampled: list = field(default_factory=list)  # (sequence, SampledToken | Exception)
    prompt_logprobs: dict = field(default_factory=dict)  # request id -> [TokenLogprobs], one per position, in order


# Rows of prompt logits computed at once for prompt logprobs: 256 x a 50k vocabulary is 50 MB of float32.
_PROMPT_LOGPROB_ROWS = 256


class KVCacheCopyError(RuntimeError):
    """Copy-on-write failed: the KV pool's bookkeeping is broken, which no one request explains."""


class ModelRunner:
    def __init__(self, config, weights, *, device: torch.device, dtype: torch.dtype, block_size: int, seed: int = 0,
                 attn_backend: type | None = None, kv_cache_dtype: str = "auto",
                 kv_groups: list[KVCacheGroup] | None = None, tp=None) -> None:
        """config: an ArchConfig (or a transformers config); weights: (HF name, tensor) pairs, or a function of a
        model's weight_shard that returns them (model/loader.py: iter_weights), or None for random (dummy) weights.
        attn_backend: the paged-attention class (model/attention/selector.py); None: the torch one.
        kv_cache_dtype: auto (the model's dtype), int8 or fp8 (model/attention/kv_quant.py).
        kv_groups: which layers share block tables (worker/kv_cache_groups.py); None: by the layers' windows.
        tp: this process's rank of a tensor-parallel group (worker/parallel.py: TPGroup), None alone. Rank 0's
        runner sends every step's input and block copies to the other ranks, which run the same forward."""
        cfg = ArchConfig.of(config)
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_quant.resolve_kv_dtype(kv_cache_dtype, dtype, device)
        self.block_size = block_size
        t0 = time.perf_counter()
        self.attn_backend = attn_backend or TorchPagedAttention
        shard = tp.shard() if tp is not None and tp.size > 1 else None
        self.tp_driver = tp if shard is not None and tp.rank == 0 else None  # rank 0 leads the others' steps
        cls = model_class(cfg)
        if shard is not None and not getattr(cls, "supports_tensor_parallel", False):
            raise ValueError(f"tensor_parallel_size > 1 is not supported for model type {cfg.model_type!r} yet "
                             "(supported: the Llama family: llama, mistral, qwen2, qwen3)")
        with torch.device("meta"):
            model = cls(cfg, self.attn_backend) if shard is None else cls(cfg, self.attn_backend, tp=shard)
        model = model.to(dtype=dtype).to_empty(device=device)
        if weights is None:
            model.init_dummy_weights(seed)
        elif callable(weights):
            model.load_weights(weights(model.weight_shard if shard is not None else None))
        else:
            model.load_weights(weights)
        model.build_tables(device, dtype)
        model.pack_for_cpu()
        self.model = model.eval()
        logger.info("model built in %.2fs (%s, %s)", time.perf_counter() - t0, dtype, device)
        self.num_layers = cfg.num_hidden_layers
        self.kv_groups = kv_groups or kv_cache_groups(cfg.layer_windows or [None] * self.num_layers)
        self.num_kv_heads = model.num_kv_heads
        self.head_dim = model.head_dim
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []  # per layer: one of the shared tensors below
        self._kv_tensors: list[torch.Tensor] = []
        self._generators: dict[str, torch.Generator] = {}
        self.cuda_graphs = None  # a DecodeGraphs (worker/cuda_graphs.py) once captured; CUDA only

    # --- KV pool ----------------------------------------------------------
    @property
    def _num_kv_tensors(self) -> int:
        """KV tensors in the pool: one per layer of the largest group (the groups' layers share them)."""
        return max(len(g.layers) for g in self.kv_groups)

    def bytes_per_block(self) -> int:
        """One block's keys and values in every layer of a group (with their scales, in a quantized pool)."""
        shape = kv_quant.pool_shape(1, self.block_size, self.num_kv_heads, self.head_dim, self.kv_dtype)
        return self._num_kv_tensors * torch.Size(shape).numel() * torch.empty((), dtype=self.kv_dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = kv_quant.pool_shape(num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.kv_dtype)
        # A quantized pool is allocated as bytes and seen as its 8-bit type (mmap'd buffers take no float8).
        raw = torch.int8 if kv_quant.is_quantized(self.kv_dtype) else self.kv_dtype
        self._kv_tensors = [_zeros(shape, raw, self.device).view(self.kv_dtype) for _ in range(self._num_kv_tensors)]
        slots = slot_of_layers(self.kv_groups)
        # A block id belongs to one group at a time, so layer i of every group can store into tensor i.
        self.kv_caches = [self._kv_tensors[slots[layer][1]] for layer in range(self.num_layers)]
        self._layer_group = [slots[layer][0] for layer in range(self.num_layers)]

    # --- one step ---------------------------------------------------------
    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    @torch.inference_mode()
    def execute(self, out) -> RunnerOutput:
        """Run one step (a SchedulerOutput); return (sequence, sampled token) for every sequence that samples,
        and the prompt logprobs the step computed.

        Each scheduled request lists the sequences that sample from its last
        logits (`sample_seqs`: one, or a prompt's n completions); each gets one
        row, sampled with its own parameters and generator. Sampling is checked
        row by row: where a row's own parameters make it fail, that row gets
        the exception instead of a token and the others are sampled as if it
        were not there. A failing forward pass raises:
        the engine core finds the request behind it (core.py).
        """
        for request_id in out.finished_req_ids:
            self._generators.pop(request_id, None)
        if out.block_copies:
            try:
                self.copy_blocks(out.block_copies)
            except Exception as exc:
                raise KVCacheCopyError(f"copy-on-write of {len(out.block_copies)} blocks failed: {exc}") from exc
        if not out.scheduled:
            return RunnerOutput()
        sampled, logits, prompt_logprobs = self.compute_logits(out.scheduled)
        if not sampled:
            return RunnerOutput(prompt_logprobs=prompt_logprobs)
        targets = [seq for s in sampled for seq in s.sample_seqs]  # one row for each sequence that samples
        if len(targets) != len(sampled):  # a prompt's last logits, sampled by each of its n children
            rows = [i for i, s in enumerate(sampled) for _ in s.sample_seqs]
            logits = logits[torch.tensor(rows, device=logits.device)]
        return RunnerOutput(list(zip(targets, self._sample(logits, targets))), prompt_logprobs)

    def _sample(self, logits: torch.Tensor, targets: list) -> list["SampledToken | Exception"]:
        results: list = [None] * len(targets)
        grammar_rows = [(i, t.grammar) for i, t in enumerate(targets) if t.grammar is not None]
        if grammar_rows:  # structured outputs: what the grammar forbids next is never sampled
            from pagedllm.structured_output.bitmask import apply_grammar_masks

            for i, exc in apply_grammar_masks(logits, grammar_rows).items():
                results[i] = exc
        ok, rows = [], []
        for i, t in enumerate(targets):
            if results[i] is not None:
                continue
            try:
                rows.append(self._sampling_row(t))
                ok.append(i)
            except Exception as exc:  # e.g. a seed its generator cannot take
                results[i] = exc
        if not ok:
            return results
        x = logits if len(ok) == len(targets) else logits[ok]
        # A batch that fails part-way may have drawn from seeded rows' generators:
        # put them back, so that sampling each row alone draws what it would have.
        states = [(r.generator, r.generator.get_state()) for r in rows if r.generator is not None]
        try:
            out = self.sampler(x, rows)
            drawn: list = [SampledToken(t, lp) for t, lp in zip(out.token_ids, out.logprobs)]
        except Exception:
            for gen, state in states:
                gen.set_state(state)
            drawn = [self._sample_alone(x[j : j + 1], row) for j, row in enumerate(rows)]
        for i, d in zip(ok, drawn):
            results[i] = d
        return results

    def _sample_alone(self, logits: torch.Tensor, row: SamplingRow) -> "SampledToken | Exception":
        try:
            out = self.sampler(logits, [row])
        except Exception as exc:
            return exc
        return SampledToken(out.token_ids[0], out.logprobs[0])

    def _sampling_row(self, req) -> SamplingRow:
        gen = self._generator(req.request_id, req.seed) if req.seed is not None else None
        return SamplingRow(req.sampling_params, req.prompt_token_ids, req.output_token_ids, gen, req.eos_token_ids)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: whole blocks from src to dst, in every layer, before anything writes to them
        (on every tensor-parallel rank: each holds its heads of every block)."""
        if self.tp_driver is not None:
            self.tp_driver.send(("copy", pairs))
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in self._kv_tensors:
            if cache.element_size() == 1:  # a quantized pool: copied as bytes (torch indexes no float8)
                cache = cache.view(torch.int8)
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def compute_logits(self, scheduled: list) -> tuple[list, torch.Tensor | None, dict]:
        """Run the model; return the requests that sample this step, their next-token logits [S, vocab] in float32,
        and the prompt logprobs of the requests that ask for them (request id -> [TokenLogprobs])."""
        step, logits_idx, sampled = self._step_input(scheduled)
        if self.tp_driver is None:
            hidden = self.forward(step)
        else:
            self.tp_driver.send(("forward", step))  # the other ranks run the same forward, in lockstep
            try:
                hidden = self.forward(step)
            except Exception as exc:
                self.tp_driver.check_after(exc)  # raises TensorParallelError where the group is broken
                raise
        logits_idx = torch.tensor(logits_idx, dtype=torch.int64, device=self.device)
        prompt_logprobs = self._prompt_logprobs(scheduled, hidden)
        if not sampled:
            return [], None, prompt_logprobs
        return sampled, self.model.compute_logits(hidden[logits_idx]), prompt_logprobs

    def _prompt_logprobs(self, scheduled: list, hidden: torch.Tensor) -> dict:
        """For each request with prompt_logprobs set: the logprob, rank and best few of every prompt token this
        step's chunk predicts (position p predicts token p + 1), from the position after those already reported."""
        result = {}
        row = 0
        for s in self._batch_order(scheduled):
            req, start, n = s.request, s.start_pos, s.num_new_tokens
            k = getattr(getattr(req, "sampling_params", None), "prompt_logprobs", None)
            if k is not None:
                first = max(start, req.num_prompt_logprobs)
                last = min(start + n, req.num_prompt_tokens - 1)  # the last prompt token predicts no prompt token
                if first < last:
                    rows = torch.arange(row + first - start, row + last - start, device=hidden.device)
                    targets = torch.tensor(req.prompt_token_ids[first + 1 : last + 1], device=hidden.device)
                    entries = []
                    for i in range(0, len(rows), _PROMPT_LOGPROB_ROWS):
                        logits = self.model.compute_logits(hidden[rows[i : i + _PROMPT_LOGPROB_ROWS]])
                        raw = torch.log_softmax(logits, dim=-1)
                        part = targets[i : i + _PROMPT_LOGPROB_ROWS]
                        entries += gather_logprobs(raw, part, [k] * len(part))
                    result[req.request_id] = entries
            row += n
        return result

    @staticmethod
    def _batch_order(scheduled: list) -> list:
        """Single-token queries first: the attention backend batches them as one decode."""
        return [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens != 1]

    @torch.inference_mode()
    def forward(self, step: "StepInput") -> torch.Tensor:
        """The model's hidden states [T, hidden] for one step's input (every tensor-parallel rank runs this)."""
        input_ids, positions, meta = self._tensors(step)
        if self.cuda_graphs is not None and isinstance(meta, AttentionMetadata) and self.cuda_graphs.fits(meta):
            return self.cuda_graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _prepare(self, scheduled: list):
        """Flat tensors for one step: input_ids, positions, AttentionMetadata, the rows to sample and their requests."""
        step, logits_idx, sampled = self._step_input(scheduled)
        return (*self._tensors(step), torch.tensor(logits_idx, dtype=torch.int64, device=self.device), sampled)

    def _step_input(self, scheduled: list) -> tuple["StepInput", list[int], list]:
        """One step's model input as plain lists, the rows whose logits are sampled, and their requests."""
        batch = self._batch_order(scheduled)
        num_groups = len(self.kv_groups)
        bs = self.block_size
        step = StepInput([], [], [0], [], sum(1 for s in batch if s.num_new_tokens == 1),
                         max(s.num_new_tokens for s in batch), [[] for _ in range(num_groups)],
                         [[] for _ in range(num_groups)])
        logits_idx: list[int] = []
        sampled = []
        qsl = step.query_start_loc
        for s in batch:
            start, n = s.start_pos, s.num_new_tokens
            step.input_ids.extend(s.token_ids)
            step.positions.extend(range(start, start + n))
            for g in range(num_groups):
                table = s.block_tables[g]
                step.slot_mappings[g].extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                step.block_tables[g].append(table)
            qsl.append(qsl[-1] + n)
            step.seq_lens.append(start + n)
            if s.needs_sample:
                logits_idx.append(qsl[-1] - 1)
                sampled.append(s)
        return step, logits_idx, sampled

    def _tensors(self, step: "StepInput"):
        """Flat tensors for one step: input_ids, positions, AttentionMetadata (one per layer where the KV cache
        has several groups)."""
        dev = self.device
        bs = self.block_size
        seq_lens, qsl, num_decodes = step.seq_lens, step.query_start_loc, step.num_decodes
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
        metas = []
        for g, group_tables in enumerate(step.block_tables):
            max_blocks = max(len(t) for t in group_tables)
            sliding = self.kv_groups[g].window is not None
            metas.append(AttentionMetadata(
                slot_mapping=torch.tensor(step.slot_mappings[g], dtype=torch.int64, device=dev),
                query_start_loc=qsl_t,
                seq_lens=seq_lens_t,
                block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in group_tables], dtype=torch.int32, device=dev),
                num_decodes=num_decodes,
                query_start_loc_cpu=qsl,
                seq_lens_cpu=seq_lens,
                max_seq_len=max(seq_lens),
                max_query_len=step.max_query_len,
                # A sliding group's leading entries may be placeholders: no prefix is read for all.
                num_common_prefix_blocks=0 if sliding else common_prefix_blocks(group_tables[:num_decodes], seq_lens[:num_decodes], bs),
            ))
        meta = metas[0] if len(metas) == 1 else [metas[g] for g in self._layer_group]
        input_ids_t = torch.tensor(step.input_ids, dtype=torch.int64, device=dev)
        positions_t = torch.tensor(step.positions, dtype=torch.int64, device=dev)
        return input_ids_t, positions_t, meta


@dataclass
class StepInput:
    """One step's model input as plain lists (the scheduled requests in batch order, decodes first): what rank 0
    of a tensor-parallel group sends the other ranks, each of which builds its own tensors from it."""

    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    num_decodes: int
    max_query_len: int
    slot_mappings: list[list[int]]  # per KV cache group
    block_tables: list[list[list[int]]]  # per KV cache group, one table per request
