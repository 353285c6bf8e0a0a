"""The usage block of responses: token counts, and how many prompt tokens the prefix cache served.

cached_tokens comes from the engine's own count for each request (the prompt
tokens whose KV blocks were found in the prefix cache at admission), so a
client can see what a repeated system prompt saved it. The counts that
streaming sends on every chunk (continuous_usage_stats) are running totals
of one choice, as vLLM sends them, and carry no details.
"""

from __future__ import annotations

from pagedllm.engine.outputs import RequestOutput
from pagedllm.entrypoints.server.protocol import PromptTokensDetails, UsageInfo


def final_usage(outputs: list[RequestOutput], completion_tokens: int | None = None) -> UsageInfo:
    """Usage over finished requests; completion_tokens overrides the count (echo with max_tokens=0 returns none)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    if completion_tokens is None:
        completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(int(o.metrics.get("num_cached_tokens", 0) or 0) for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def running_usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    """One choice's counts so far, for stream_options.continuous_usage_stats."""
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
