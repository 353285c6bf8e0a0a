"""EngineCore: schedule -> execute -> update, one step at a time.

The core owns the scheduler, the KV cache manager and the model runner, and
nothing else: it takes validated requests (EngineCoreRequest) and aborts, and
each step returns the new token ids of the sequences that ran, with the
reasons of those that finished. It never sees text. The same class runs in its
own process behind the server and the offline LLM (core_proc.py), or in the
caller's process (core_client.InprocClient).

One request's failure is that request's alone. A sampling row that raises
fails its request only (the runner samples the others as if it were not
there); a forward pass that raises is run again on smaller groups of the
step's requests until the request whose input makes it fail is found, and
that one ends with finish_reason "error" while the rest go on.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial

from pagedllm.config import EngineConfig
from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.messages import CoreInfo, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, NewLogprobs
from pagedllm.engine.outputs import EngineStats
from pagedllm.engine.request import FinishReason, Request
from pagedllm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        # Torch-side pieces are imported here so that importing the engine's
        # bookkeeping (scheduler, KV cache manager) never needs torch.
        from pagedllm.model.attention.selector import get_attention_backend
        from pagedllm.model.loader import iter_weights, resolve_model
        from pagedllm.worker.kv_cache_groups import kv_cache_groups
        from pagedllm.worker.model_runner import resolve_device, resolve_dtype

        t0 = time.perf_counter()
        self.config = config
        source = resolve_model(config.model, config.revision)
        cfg = source.config
        self.eos_token_ids = tuple(source.eos_token_ids)
        model_len = model_context_len(cfg)
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise ValueError(f"max_model_len {config.max_model_len} is longer than the model's context of {model_len} tokens")
        self.max_model_len = config.max_model_len or model_len

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        # A function of the model's weight_shard: a tensor-parallel rank reads only its part of each weight.
        weights = None if config.load_format == "dummy" else partial(iter_weights, source)
        attn_backend = get_attention_backend(device.type, config.attention_backend)
        windows = cfg.layer_windows or [None] * cfg.num_hidden_layers
        if config.disable_hybrid_kv_cache_manager:
            windows = [None] * len(windows)  # one group that keeps everything; the layers still mask their windows
        kv_groups = kv_cache_groups(windows, self.max_model_len)
        self.tp = None  # with tensor_parallel_size > 1: this rank 0's TPGroup (worker/parallel.py)
        if config.tensor_parallel_size > 1:
            from pagedllm.worker.parallel import start_tensor_parallel

            self.tp = start_tensor_parallel(config, cfg, device, dtype, self.max_model_len, kv_groups)
        try:
            num_blocks = self._build(config, cfg, weights, device, dtype, attn_backend, kv_groups)
        except BaseException:
            self.shutdown()
            raise
        self.info = CoreInfo(
            model_path=source.path, dtype=str(dtype).replace("torch.", ""), kv_cache_dtype=str(self.runner.kv_dtype).replace("torch.", ""),
            device=str(device), max_model_len=self.max_model_len,
            num_blocks=num_blocks, block_size=config.block_size, bytes_per_block=self.runner.bytes_per_block(),
            eos_token_ids=self.eos_token_ids, vocab_size=cfg.vocab_size, pid=os.getpid(),
        )
        self.requests: dict[str, Request] = {}  # unfinished requests by id (the parent of n > 1 sequences)
        self.structured_outputs = None  # a StructuredOutputManager, from the first request with structured outputs
        self._compiling: list = []  # (request, spec, future): waiting for their grammar, outside the scheduler
        self._outputs: list[EngineCoreOutput] = []  # produced between steps (a request refused on arrival)
        self.log_stats = False  # attach stats() to every step's outputs (the server's metrics)
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info(
            "engine core ready in %.2fs: %s, %s, KV pool %d blocks x %d tokens = %d tokens in %s (%.2f GiB%s), max_model_len %d",
            time.perf_counter() - t0, source.path, self.info.dtype, self.info.num_blocks, config.block_size,
            self.info.num_blocks * config.block_size, self.info.kv_cache_dtype, self.info.kv_cache_gib,
            f" on each of {config.tensor_parallel_size} ranks" if self.tp else "", self.max_model_len,
        )

    def _build(self, config, cfg, weights, device, dtype, attn_backend, kv_groups) -> int:
        """The model runner (this rank's share of the model), the KV pool and the scheduler; returns the pool's blocks."""
        from pagedllm.worker.model_runner import ModelRunner

        self.runner = ModelRunner(cfg, weights, device=device, dtype=dtype, block_size=config.block_size, seed=config.seed,
                                  attn_backend=attn_backend, kv_cache_dtype=config.kv_cache_dtype, kv_groups=kv_groups,
                                  tp=self.tp)
        if self.tp is not None:
            self.tp.wait_ready("ready", "load its share of the model")
        if device.type == "cuda" and not config.kv_cache_size_given:
            from pagedllm.worker.gpu_memory import gpu_kv_blocks

            num_blocks = gpu_kv_blocks(self.runner, config, self.max_model_len)
        else:
            num_blocks = config.num_kv_blocks or config.kv_cache_bytes // self.runner.bytes_per_block()
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                       tuple(g.window for g in kv_groups))
        one_request = self.kv_cache.max_blocks(self.max_model_len, config.max_num_batched_tokens)
        if num_blocks < one_request:
            raise ValueError(
                f"the KV cache has {num_blocks} blocks of {config.block_size} tokens, fewer than the {one_request} that one "
                f"request of max_model_len={self.max_model_len} needs: raise kv_cache_memory (on CUDA: gpu_memory_utilization) "
                f"or lower max_model_len"
            )
        self.runner.allocate_kv_cache(num_blocks)
        if self.tp is not None:
            self.tp.send(("allocate", num_blocks))  # every rank's pool: its own KV heads, the same blocks
            self.tp.wait_ready("allocated", "allocate its KV pool")
        # CUDA graphs are not captured across tensor-parallel ranks yet (their all-reduces would be in the graphs).
        if device.type == "cuda" and not config.enforce_eager and len(kv_groups) == 1 and self.tp is None:
            from pagedllm.worker.cuda_graphs import capture_decode_graphs

            self.runner.cuda_graphs = capture_decode_graphs(self.runner, config.max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(SchedulerConfig.from_engine(config, self.max_model_len), self.kv_cache)
        return num_blocks

    def shutdown(self) -> None:
        """Stop the grammar compile thread (pending compiles are dropped) and the other tensor-parallel ranks."""
        if getattr(self, "structured_outputs", None) is not None:  # None, or not set yet when __init__ failed
            self.structured_outputs.shutdown()
        if self.tp is not None:
            self.tp.close()

    # --- requests ---------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.requests:
            self._outputs.append(EngineCoreOutput(req.request_id, 0, [], finish_reason="error",
                                                  error=f"request id {req.request_id!r} is already in use"))
            return
        root = self._sequence(req)  # with n > 1, its children too: the request computes the prompt, they the completions
        self.requests[req.request_id] = root
        self.prompt_tokens_total += root.num_prompt_tokens
        spec = req.sampling_params.structured_outputs
        if spec is not None:
            manager = self._structured_outputs()
            grammar = manager.cached(spec)
            if grammar is None:  # it waits outside the scheduler until compiled (step() polls)
                self._compiling.append((root, spec, manager.submit(spec)))
                return
            self._attach_grammar(root, grammar)
        self.scheduler.add_request(root)

    def _structured_outputs(self):
        """The grammar manager, made at the first structured request (it loads the tokenizer on its own thread)."""
        if self.structured_outputs is None:
            from pagedllm.structured_output.backend import XgrammarBackend
            from pagedllm.structured_output.manager import StructuredOutputManager
            from pagedllm.tokenizer import load_tokenizer

            path, vocab, eos = self.info.model_path, self.info.vocab_size, list(self.eos_token_ids)
            self.structured_outputs = StructuredOutputManager(lambda: XgrammarBackend.from_tokenizer(load_tokenizer(path), vocab, eos))
        return self.structured_outputs

    def _attach_grammar(self, root: Request, grammar) -> None:
        """Each sequence that samples gets its own matcher (n > 1: one per completion)."""
        for seq in root.sequences:
            seq.grammar = self.structured_outputs.matcher(grammar)

    def _admit_compiled(self, outputs: list[EngineCoreOutput]) -> None:
        """Requests whose grammar compiled since the last step join the scheduler; one that failed to compile ends alone."""
        still = []
        for root, spec, fut in self._compiling:
            if root.is_finished:  # aborted while its grammar compiled
                continue
            if not fut.done():
                still.append((root, spec, fut))
                continue
            try:
                grammar = self.structured_outputs.collect(spec, fut)
            except Exception as exc:
                self._fail(root, exc, outputs)
                continue
            self._attach_grammar(root, grammar)
            self.scheduler.add_request(root)
        self._compiling = still

    def _sequence(self, req: EngineCoreRequest) -> Request:
        return Request(req.request_id, req.prompt_token_ids, req.sampling_params, eos_token_ids=self.eos_token_ids,
                       arrival_time=req.arrival_time)

    def abort_requests(self, targets: list) -> None:
        """End requests (an id) or single sequences of them (an (id, index) pair) now, freeing their blocks.

        Aborts come from the frontend, which has already ended the request on
        its side, so they produce no outputs. Unknown or finished ids are ignored.
        """
        for target in targets:
            request_id, index = (target, None) if isinstance(target, str) else target
            root = self.requests.get(request_id)
            if root is None:
                continue
            if index is None or len(root.sequences) == 1:
                seqs = [root, *root.children]
            else:
                seqs = [s for s in root.children if s.index == index]
            for seq in seqs:
                self.scheduler.finish_request(seq, FinishReason.ABORT)
            if all(s.is_finished for s in root.sequences):
                self.scheduler.finish_request(root, FinishReason.ABORT)
                del self.requests[request_id]

    def has_work(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self._outputs) or bool(self.scheduler.finished_req_ids)
                or bool(self._compiling))

    # --- one step ---------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        outputs, self._outputs = self._outputs, []
        if self._compiling:
            self._admit_compiled(outputs)
        out = self.scheduler.schedule()
        if out.is_empty:
            self.runner.execute(out)  # nothing to run, but the runner drops the state of finished requests
            if self._compiling and not outputs:  # only grammars to wait for: wait for them, not in a busy loop
                self.structured_outputs.wait([fut for _, _, fut in self._compiling], timeout=0.05)
            return EngineCoreOutputs(outputs)
        self.num_steps += 1
        results = self._execute(out, outputs)
        self.scheduler.update_after_step(out)
        self._prompt_logprob_outputs(out, results.prompt_logprobs, outputs)
        # A row that failed, or a token its grammar refuses, ends its request (after the others' tokens are in).
        ok, failed = [], {}
        for seq, sampled in results.sampled:
            root = seq.root
            if root.request_id not in self.requests or root.request_id in failed:
                continue  # failed in this step already
            if isinstance(sampled, Exception):
                failed[root.request_id] = (root, sampled)
            elif seq.grammar is not None and not seq.grammar.accept(sampled.token_id):
                failed[root.request_id] = (root, ValueError(f"token {sampled.token_id} does not continue the request's grammar"))
            else:
                ok.append((seq, sampled))
        reasons = self.scheduler.update([(seq, sampled.token_id) for seq, sampled in ok])
        self.generation_tokens_total += len(ok)
        for root, exc in failed.values():
            self._fail(root, exc, outputs)
        touched = [self._output(seq, sampled, reason) for (seq, sampled), reason in zip(ok, reasons)]
        outputs.extend(touched)
        for out_ in touched:
            root = self.requests.get(out_.request_id)
            if root is not None and all(s.is_finished for s in root.sequences):
                del self.requests[out_.request_id]
        return EngineCoreOutputs(outputs)

    def _execute(self, out: SchedulerOutput, outputs: list[EngineCoreOutput]):
        """Run the step (a RunnerOutput); if the forward pass raises, find the request behind it and end that one alone."""
        from pagedllm.worker.model_runner import KVCacheCopyError, RunnerOutput
        from pagedllm.worker.parallel import TensorParallelError

        fatal = (KVCacheCopyError, TensorParallelError)  # no one request explains these: the core stops
        try:
            return self.runner.execute(out)
        except fatal:
            raise
        except Exception as exc:
            logger.warning("a step over %d requests failed (%s: %s); running it again in smaller groups to find the "
                           "request that makes it fail", len(out.scheduled), type(exc).__name__, exc)
        results = RunnerOutput()
        groups = [out.scheduled]
        while groups:
            group = groups.pop()
            try:
                part = self.runner.execute(SchedulerOutput(scheduled=group))
                results.sampled.extend(part.sampled)
                results.prompt_logprobs.update(part.prompt_logprobs)
            except fatal:
                raise
            except Exception as exc:
                if len(group) > 1:
                    half = len(group) // 2
                    groups += [group[half:], group[:half]]
                else:
                    logger.error("request %s makes the forward pass fail; ending it alone", group[0].request.root.request_id,
                                 exc_info=exc)
                    self._fail(group[0].request.root, exc, outputs)
        out.scheduled = [s for s in out.scheduled if not s.request.is_finished]
        return results

    def _prompt_logprob_outputs(self, out: SchedulerOutput, computed: dict, outputs: list[EngineCoreOutput]) -> None:
        """The prompt positions' logprobs computed this step, to their requests, before any of their tokens."""
        for s in out.scheduled:
            entries = computed.get(s.request_id)
            if entries is None:
                continue
            req = s.request
            req.num_prompt_logprobs += len(entries)
            outputs.append(EngineCoreOutput(req.root.request_id, 0, [], prompt_logprobs=[
                NewLogprobs(lp.logprob, lp.rank, lp.top_ids, lp.top_logprobs) for lp in entries]))

    def _fail(self, root: Request, exc: BaseException, outputs: list[EngineCoreOutput]) -> None:
        """End a request, with all of its sequences, with finish_reason "error" and the exception's message."""
        for seq in [root, *root.children]:
            self.scheduler.finish_request(seq, FinishReason.ERROR)
        self.requests.pop(root.request_id, None)
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("request %s failed: %s", root.request_id, message)
        outputs.append(EngineCoreOutput(root.request_id, 0, [], finish_reason="error", error=message,
                                        num_cached_tokens=root.num_cached_tokens, num_preemptions=root.num_preemptions))

    @staticmethod
    def _output(seq: Request, sampled, reason: FinishReason | None) -> EngineCoreOutput:
        root = seq.root
        lp = sampled.logprobs
        return EngineCoreOutput(
            root.request_id, seq.index, [sampled.token_id],
            None if lp is None else [NewLogprobs(lp.logprob, lp.rank, lp.top_ids, lp.top_logprobs)],
            finish_reason=None if reason is None else reason.value,
            stop_reason=seq.stop_reason,
            num_cached_tokens=root.num_cached_tokens,
            num_preemptions=root.num_preemptions + (seq.num_preemptions if seq is not root else 0),
        )

    # --- utilities (called between steps) ---------------------------------
    def stats(self) -> EngineStats:
        kv = self.kv_cache.stats()
        return EngineStats(
            num_blocks=kv.num_blocks,
            kv_cache_tokens=kv.num_blocks * self.kv_cache.block_size,
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

    def set_log_stats(self, on: bool) -> None:
        self.log_stats = bool(on)

    def reset_peak_stats(self) -> None:
        self.kv_cache.reset_peak()

    def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes (only while no request holds blocks); returns whether it was done."""
        return self.kv_cache.reset_prefix_cache()

    def set_max_num_seqs(self, n: int) -> None:
        """Seats per step, changed between runs on an idle engine (benchmark sweeps)."""
        if self.scheduler.has_unfinished_requests():
            raise RuntimeError("max_num_seqs can only change while no request runs")
        self.config.max_num_seqs = self.scheduler.config.max_num_seqs = n

    def check_invariants(self) -> None:
        self.kv_cache.check_invariants()

    def beam_search(self, requests: list[EngineCoreRequest], params) -> list:
        """Beam search over shared blocks (engine/beam_search.py); runs on an idle engine. Outputs carry token ids, no text."""
        from pagedllm.engine.beam_search import BeamSearchRunner

        seqs = [self._sequence(r) for r in requests]
        return BeamSearchRunner(self).run(seqs, params)


def model_context_len(cfg) -> int:
    return cfg.max_position_embeddings

