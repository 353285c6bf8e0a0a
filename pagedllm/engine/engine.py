"""LLMEngine: the frontend of one engine core, driven step by step (add_request / step / abort / stats).

The frontend keeps the tokenizer and everything about text: the input
processor turns prompts into validated EngineCoreRequests, the core client
carries them to the EngineCore (in its own process unless
`core_process=False`), and the output processor turns each step's new token
ids into RequestOutputs. Every request ends with a finish reason; one that
fails ends alone with "error" and a message.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref

from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import make_client
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.engine.messages import EngineCoreRequest
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.outputs import EngineStats, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.model.loader import resolve_model
        from pagedllm.tokenizer import load_tokenizer

        t0 = time.perf_counter()
        self.config = config
        source = resolve_model(config.model, config.revision)
        self.model_config = source.config
        self.tokenizer = load_tokenizer(config.tokenizer or source.path, trust_remote_code=config.trust_remote_code)
        # The core loads what was resolved here: a GGUF file is converted once, a hub repo fetched once.
        self.client = make_client(dataclasses.replace(config, model=source.path, revision=None))
        self._finalizer = weakref.finalize(self, self.client.shutdown)
        info = self.info = self.client.info
        self.model_path = info.model_path
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self.dtype = info.dtype
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                              config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pending: list[RequestOutput] = []  # outputs of requests aborted between steps
        self.last_stats: EngineStats | None = None  # after the latest step, once set_log_stats(True)
        pids = [i.pid for i in getattr(self.client, "infos", [info])]  # every data-parallel core's, else the one
        where = (f"{len(pids)} cores in processes {', '.join(map(str, pids))}" if len(pids) > 1
                 else f"core in process {pids[0]}" if config.core_process else "core in this process")
        logger.info("engine ready in %.2fs (%s)", time.perf_counter() - t0, where)

    @classmethod
    def from_options(cls, **options) -> "LLMEngine":
        return cls(EngineConfig(**options))

    @property
    def core(self):
        """The EngineCore itself, where it runs in this process (core_process=False): for tests and debugging."""
        core = getattr(self.client, "core", None)
        if core is None:
            raise AttributeError("the engine core runs in its own process; build the engine with core_process=False to reach it")
        return core

    @property
    def num_blocks(self) -> int:
        return self.info.num_blocks

    @property
    def block_size(self) -> int:
        return self.info.block_size

    # --- requests ---------------------------------------------------------
    # One way in: add_request (one request) or add_requests (several, seen by the same step). make_request only
    # checks a prompt and its parameters, so that a caller can refuse a bad one before submitting anything.
    def make_request(self, prompt: str | dict, params: SamplingParams | None = None, request_id: str | None = None) -> EngineCoreRequest:
        """Check a prompt and its parameters; raise ValueError saying what is wrong. Adds nothing."""
        return self.input_processor.process(prompt, params, request_id)

    def add_request(self, request_id: str | None, prompt: str | dict | EngineCoreRequest, params: SamplingParams | None = None,
                    *, final_only: bool = False) -> str:
        """Submit a prompt with its parameters, or (as vLLM's) a request already made by make_request; returns its id.
        final_only: step() reports it only once it has finished."""
        if isinstance(prompt, EngineCoreRequest):
            if request_id is not None and request_id != prompt.request_id:
                raise ValueError(f"request_id {request_id!r} differs from the id {prompt.request_id!r} of the request given")
            req = prompt
        else:
            req = self.make_request(prompt, params, request_id)
        self.add_requests([req], final_only)
        return req.request_id

    def add_requests(self, reqs: list[EngineCoreRequest], final_only: bool = False) -> None:
        """Submit requests made by make_request together: the core's next step sees them all (a batch, not a trickle)."""
        for i, req in enumerate(reqs):
            try:
                self.output_processor.add_request(req, final_only)
            except ValueError:
                self.output_processor.abort([r.request_id for r in reqs[:i]])
                raise
        self.client.add_requests(reqs)

    def abort_request(self, request_id: str | list[str]) -> None:
        """End requests now and free their blocks; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._pending.extend(self.output_processor.abort(ids))
        if self.client.dead_reason is None:  # a core that is gone holds nothing to free
            self.client.abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    # --- one step ---------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """The outputs of the core's next step (with a core process, it may have run ahead: steps queue up)."""
        outputs, self._pending = self._pending, []
        if not self.output_processor.has_unfinished_requests():
            return outputs
        core_out = self.client.get_outputs()
        if core_out is None:
            return outputs
        if core_out.stats is not None:
            self.last_stats = core_out.stats
        results, aborts = self.output_processor.process_outputs(core_out.outputs)
        if aborts:
            self.client.abort_requests(aborts)
        return outputs + results

    # --- beam search ------------------------------------------------------
    def beam_search(self, prompts: list, params) -> list:
        """Beam search over shared blocks (see engine/beam_search.py); runs on an idle engine."""
        requests = [self.make_request(p, SamplingParams(max_tokens=params.max_tokens)) for p in prompts]
        results = self.client.call("beam_search", requests, params)
        for result in results:
            for seq in result.sequences:
                seq.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        return results

    # --- the core's state ---------------------------------------------------
    def stats(self) -> EngineStats:
        return self.client.call("stats")

    def set_log_stats(self, on: bool = True) -> None:
        """Have every step carry the engine's stats (last_stats; the server's metrics)."""
        self.client.call("set_log_stats", on)

    def reset_peak_stats(self) -> None:
        self.client.call("reset_peak_stats")

    def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes (only while no request holds blocks); returns whether it was done."""
        return self.client.call("reset_prefix_cache")

    def set_max_num_seqs(self, n: int) -> None:
        """Seats per step, changed between runs on an idle engine (benchmark sweeps)."""
        self.client.call("set_max_num_seqs", n)

    def check_invariants(self) -> None:
        """The KV cache's invariants (DESIGN.md), checked in the core; raises AssertionError if one fails."""
        self.client.call("check_invariants")

    def shutdown(self) -> None:
        """Stop the core (its process ends); also done when the engine is garbage collected or Python exits."""
        self._finalizer()
