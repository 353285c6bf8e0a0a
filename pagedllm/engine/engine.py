"""LLMEngine: add_request / step / abort / stats.

One step: the scheduler picks who runs and how many tokens each computes, the
model runner computes them and samples, and the engine appends the sampled
tokens, detokenizes, checks stop conditions and frees what finished. Every
request ends with a finish reason; a failing step ends the requests in it with
"error" and a message instead of taking the engine down.
"""

from __future__ import annotations

import itertools
import logging
import time

from pagedllm.config import EngineConfig
from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.outputs import CompletionOutput, EngineStats, Logprob, RequestOutput
from pagedllm.engine.request import FinishReason, Request
from pagedllm.engine.scheduler import Scheduler, SchedulerConfig
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        # Torch-side pieces are imported here so that importing the engine's
        # bookkeeping (scheduler, KV cache manager) never needs torch.
        from pagedllm.model.attention.selector import get_attention_backend
        from pagedllm.model.loader import iter_weights, resolve_model
        from pagedllm.tokenizer import load_tokenizer
        from pagedllm.worker.model_runner import ModelRunner, resolve_device, resolve_dtype

        t0 = time.perf_counter()
        self.config = config
        source = resolve_model(config.model, config.revision)
        self.model_path = source.path
        self.model_config = cfg = source.config
        self.tokenizer = load_tokenizer(config.tokenizer or source.path, trust_remote_code=config.trust_remote_code)
        self.eos_token_ids = tuple(source.eos_token_ids)

        model_len = _model_context_len(cfg)
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise ValueError(f"max_model_len {config.max_model_len} is longer than the model's context of {model_len} tokens")
        self.max_model_len = config.max_model_len or model_len

        device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device)
        weights = None if config.load_format == "dummy" else iter_weights(source)
        attn_backend = get_attention_backend(device.type, config.attention_backend)
        self.runner = ModelRunner(cfg, weights, device=device, dtype=self.dtype, block_size=config.block_size, seed=config.seed,
                                  attn_backend=attn_backend)

        if device.type == "cuda" and not config.kv_cache_size_given:
            from pagedllm.worker.gpu_memory import gpu_kv_blocks

            num_blocks = gpu_kv_blocks(self.runner, config, self.max_model_len)
        else:
            num_blocks = config.num_kv_blocks or config.kv_cache_bytes // self.runner.bytes_per_block()
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of {config.block_size}), "
                f"fewer than max_model_len={self.max_model_len}: raise kv_cache_memory (on CUDA: gpu_memory_utilization) or lower max_model_len"
            )
        self.runner.allocate_kv_cache(num_blocks)
        if device.type == "cuda" and not config.enforce_eager:
            from pagedllm.worker.cuda_graphs import capture_decode_graphs

            self.runner.cuda_graphs = capture_decode_graphs(self.runner, config.max_num_seqs, self.max_model_len)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.scheduler = Scheduler(sched_cfg, self.kv_cache)

        self.requests: dict[str, Request] = {}
        self._token_text: dict[int, str] = {}  # decode_token's cache, for logprob entries
        self._pending: list[RequestOutput] = []  # outputs of requests aborted between steps
        self._ids = itertools.count()
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info(
            "engine ready in %.2fs: %s, %s, KV pool %d blocks x %d tokens (%.2f GiB), max_model_len %d",
            time.perf_counter() - t0, self.model_path, self.dtype, num_blocks, config.block_size,
            num_blocks * self.runner.bytes_per_block() / (1 << 30), self.max_model_len,
        )

    @classmethod
    def from_options(cls, **options) -> "LLMEngine":
        return cls(EngineConfig(**options))

    # --- requests ---------------------------------------------------------
    def make_request(self, prompt: str | dict, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """Check a prompt and its parameters; raise ValueError saying what is wrong. Adds nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, token_ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise ValueError('a prompt must be a string, {"prompt": str} or {"prompt_token_ids": [int, ...]}, got ' + repr(prompt)[:80])
        vocab = self.model_config.vocab_size
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but the model's context (max_model_len) is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for an output token"
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        req = self._sequence(request_id, text, list(token_ids), params, index=0, seed=params.seed)
        if params.n > 1:
            # The request computes the prompt; its n children carry the completions.
            req.children = [
                self._sequence(f"{request_id}#{i}", text, req.prompt_token_ids, params, index=i,
                               seed=None if params.seed is None else params.seed + i, parent=req)
                for i in range(params.n)
            ]
        return req

    def _sequence(self, request_id, text, token_ids, params, *, index, seed, parent=None) -> Request:
        req = Request(request_id, text, token_ids, params, eos_token_ids=self.eos_token_ids,
                      parent=parent, index=index, seed=seed)
        req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        return req

    def add_request(self, request_id: str | None, prompt: str | dict, params: SamplingParams | None = None) -> str:
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.add(self.make_request(prompt, params, request_id))

    def add(self, req: Request) -> str:
        self.requests[req.request_id] = req
        self.scheduler.add_request(req)
        self.prompt_tokens_total += req.num_prompt_tokens
        return req.request_id

    def abort_request(self, request_id: str | list[str]) -> None:
        """End requests now and free their blocks; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            req = self.requests.pop(rid, None)
            if req is not None:
                for seq in [req, *req.children]:
                    self._finish(seq, FinishReason.ABORT)
                self._pending.append(self._output(req))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # --- one step ---------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return outputs
        self.num_steps += 1
        try:
            results = self.runner.execute(out.scheduled, out.block_copies)
        except Exception as exc:  # the step failed: end its requests with the reason, keep serving
            logger.exception("step failed; ending its %d requests with an error", len(out.scheduled))
            failed: dict[str, Request] = {}
            for s in out.scheduled:
                top = s.request.parent or s.request
                top.error = f"{type(exc).__name__}: {exc}"
                for seq in [top, *top.children]:
                    self._finish(seq, FinishReason.ERROR)
                failed[top.request_id] = top
            for top in failed.values():
                self.requests.pop(top.request_id, None)
                outputs.append(self._output(top))
            return outputs
        self.scheduler.update_after_step(out)
        touched: dict[str, Request] = {}
        for seq, sampled in results:
            top = seq.parent or seq
            if seq.parent is not None and not top.is_finished:
                self._fork(top)
            self._append_token(seq, sampled)
            touched[top.request_id] = top
        for top in touched.values():
            output = self._output(top)
            if output.finished:
                self.requests.pop(top.request_id, None)
            outputs.append(output)
        return outputs

    def _fork(self, top: Request) -> None:
        """The prompt is computed: its n sequences take over its blocks and it leaves the batch."""
        self.scheduler.add_forked(top, top.children)
        self.scheduler.finish_request(top, FinishReason.STOP)
        self.runner.release(top.request_id)

    def _append_token(self, req: Request, sampled) -> None:
        token = sampled.token_id
        params = req.sampling_params
        top = req.parent or req
        if top.first_token_time is None:
            top.first_token_time = time.monotonic()
        req.append_output_token(token)
        self.generation_tokens_total += 1
        if sampled.logprobs is not None:
            self._record_logprobs(req, sampled.logprobs)
        stop_str = req.detokenizer.append(token)
        n = req.num_output_tokens
        reason = None
        if n >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                reason = FinishReason.STOP
            elif token in params.stop_token_ids:
                reason, req.stop_reason = FinishReason.STOP, token
            elif stop_str is not None:
                reason, req.stop_reason = FinishReason.STOP, stop_str
        if reason is None and (
            (params.max_tokens is not None and n >= params.max_tokens) or req.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(req, reason)

    def _record_logprobs(self, req: Request, lp) -> None:
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, decode_token(self.tokenizer, lp.token_id, self._token_text))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in entry:
                entry[tid] = Logprob(value, rank, decode_token(self.tokenizer, tid, self._token_text))
        req.logprobs.append(entry)
        req.cumulative_logprob += lp.logprob

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """End one sequence: its blocks go back to the pool at once."""
        if req.is_finished:
            return
        req.detokenizer.finish()  # flush a character cut off by the last token
        self.scheduler.finish_request(req, reason)
        self.runner.release(req.request_id)

    def _output(self, top: Request) -> RequestOutput:
        seqs = top.sequences
        metrics = {
            "arrival_time": top.arrival_time,
            "first_token_time": top.first_token_time,
            "num_preemptions": sum(s.num_preemptions for s in {top, *seqs}),
            "num_cached_tokens": top.num_cached_tokens,
        }
        finished = all(s.is_finished for s in seqs)
        return RequestOutput(top.request_id, top.prompt, top.prompt_token_ids, [self._completion(s) for s in seqs],
                             finished, top.error, metrics)

    @staticmethod
    def _completion(req: Request) -> CompletionOutput:
        return CompletionOutput(
            index=req.index,
            # Stream-safe: never text that a stop string may still cut.
            text=req.detokenizer.stream_text,
            token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            finish_reason=req.finish_reason.value if req.finish_reason is not None else None,
            stop_reason=req.stop_reason,
        )

    # --- beam search ------------------------------------------------------
    def beam_search(self, prompts: list, params) -> list:
        """Beam search over shared blocks (see engine/beam_search.py); runs on an idle engine."""
        from pagedllm.engine.beam_search import BeamSearchRunner

        requests = [self.make_request(p, SamplingParams(max_tokens=params.max_tokens)) for p in prompts]
        return BeamSearchRunner(self).run(requests, params)

    def reset_peak_stats(self) -> None:
        self.kv_cache.reset_peak()

    def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes (only while no request holds blocks); returns whether it was done."""
        return self.kv_cache.reset_prefix_cache()

    # --- stats ------------------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv_cache.stats()
        return EngineStats(
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            num_used_blocks=kv.num_used_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            kv_utilization=kv.kv_utilization,
            num_cached_blocks=kv.num_cached_blocks,
            peak_used_blocks=kv.peak_used_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_steps=self.num_steps,
        )


def _model_context_len(cfg) -> int:
    n = cfg.max_position_embeddings
    window = cfg.sliding_window
    if window:
        # Sliding-window attention is not implemented: past the window our
        # outputs would differ from the model's, so the context stops there.
        n = min(n, window)
    return n
