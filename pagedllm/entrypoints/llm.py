"""The offline API: `LLM(model).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from pagedllm.config import EngineConfig
from pagedllm.engine.beam_search import BeamSearchOutput, BeamSearchParams
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.outputs import EngineStats, RequestOutput
from pagedllm.sampling_params import SamplingParams

PromptType = str | dict


class LLM:
    def __init__(self, model: str | None = None, **engine_options) -> None:
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known - {'model'}))}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        prompts = _prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        elif not isinstance(sampling_params, Iterable) or isinstance(sampling_params, (str, dict)):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, one per prompt; got "
                             f"{type(sampling_params).__name__}")
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts: give one, or one per prompt")
        # Check every prompt before adding any, so a bad one leaves nothing half-submitted.
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(requests, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """The beam_width best sequences for each prompt, best first (see engine/beam_search.py)."""
        prompts = _prompt_list(prompts)
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        return self.engine.beam_search(prompts, params)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the model's chat template.

        tools: OpenAI function tools, shown to the model (pagedllm/tool_prompt.py); read the
        calls out of the text with a parser from pagedllm.entrypoints.server.tool_parsers.
        """
        from pagedllm.tokenizer import apply_chat_template

        if not messages:
            raise ValueError("messages is empty: give at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            ids = apply_chat_template(self.engine.tokenizer, conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                                      tools=tools)
            prompts.append({"prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        engine.add_requests(requests, final_only=True)  # nothing is built for a request before it ends
        order = {req.request_id: i for i, req in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", unit="req", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([r.request_id for r in requests])
            raise
        finally:
            if bar is not None:
                bar.close()
        errors = [r for r in results if r is not None and r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed; first: {errors[0].error}")
        return results  # type: ignore[return-value]


def _prompt_list(prompts) -> list:
    """One prompt (a string or a dict) or an iterable of them, as a list; the input processor checks each."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a prompt (a string, {{\"prompt\": str}} or {{\"prompt_token_ids\": [int, ...]}}) "
                         f"or a list of them; got {type(prompts).__name__}")
    return list(prompts)
