"""The engine's per-token logprob dicts in OpenAI's two formats.

The engine gives, per generated token, {token_id: Logprob(logprob, rank,
decoded_token)} holding the sampled token and the top-k alternatives.
/v1/completions wants the legacy parallel lists (tokens, token_logprobs,
top_logprobs as {text: logprob}, text_offset); chat wants a list of
{token, logprob, bytes, top_logprobs: [...]}.
"""

from __future__ import annotations

from pagedllm.engine.outputs import Logprob
from pagedllm.entrypoints.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -inf; vLLM clamps the same way.
_FLOOR = -9999.0


def _value(lp: Logprob) -> float:
    return max(lp.logprob, _FLOOR)


def _token(token_id: int, lp: Logprob, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else (lp.decoded_token or "")


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], as_ids: bool, offset: int) -> CompletionLogprobs:
    """Legacy format; top_logprobs holds the top-k and, as OpenAI does, always the sampled token."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        sampled = entry[tid]
        text = _token(tid, sampled, as_ids)
        out.tokens.append(text)
        out.token_logprobs.append(_value(sampled))
        out.top_logprobs.append({_token(t, lp, as_ids): _value(lp) for t, lp in entry.items()})
        out.text_offset.append(offset)
        offset += len(sampled.decoded_token or "")
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int, as_ids: bool) -> list[ChatTokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries):
        sampled = entry[tid]
        ranked = sorted((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k)
        top = [_top(t, lp, as_ids) for _, t, lp in ranked[:top_k]]
        out.append(ChatTokenLogprob(**_top(tid, sampled, as_ids).model_dump(), top_logprobs=top))
    return out


def _top(token_id: int, lp: Logprob, as_ids: bool) -> TopLogprob:
    text = _token(token_id, lp, as_ids)
    return TopLogprob(token=text, logprob=_value(lp), bytes=list((lp.decoded_token or "").encode("utf-8")))
