"""The engine's per-token logprob dicts in OpenAI's two formats, and vLLM's prompt_logprobs.

The engine gives, per generated token, {token_id: Logprob(logprob, rank,
decoded_token)} holding the sampled token and the top-k alternatives.
/v1/completions wants the legacy parallel lists (tokens, token_logprobs,
top_logprobs as {text: logprob}, text_offset); chat wants a list of
{token, logprob, bytes, top_logprobs: [...]}. Prompt logprobs come in the
same dicts, with None for the first prompt token (nothing comes before it);
the legacy lists show that position as null, as OpenAI's echo did.
"""

from __future__ import annotations

from collections.abc import Callable

from pagedllm.engine.outputs import Logprob
from pagedllm.entrypoints.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -inf; vLLM clamps the same way.
_FLOOR = -9999.0


def _value(lp: Logprob) -> float:
    return max(lp.logprob, _FLOOR)


def _token(token_id: int, lp: Logprob, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else (lp.decoded_token or "")


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob] | None], as_ids: bool, offset: int,
    top: int | None = None, token_text: Callable[[int], str] | None = None,
) -> tuple[CompletionLogprobs, int]:
    """Legacy format, and the text offset after the last token.

    top_logprobs holds the best `top` (all the entry has when None or -1) and,
    as OpenAI does, always the token itself. A None entry (the first prompt
    token) gives null logprobs; its text comes from token_text.
    """
    top = None if top is not None and top < 0 else top
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            text = token_text(tid) if token_text is not None else ""
            out.tokens.append(f"token_id:{tid}" if as_ids else text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            sampled = entry[tid]
            text = sampled.decoded_token or ""
            out.tokens.append(_token(tid, sampled, as_ids))
            out.token_logprobs.append(_value(sampled))
            out.top_logprobs.append({
                _token(t, lp, as_ids): _value(lp) for t, lp in entry.items()
                if t == tid or top is None or (lp.rank is not None and lp.rank <= top)
            })
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token null or {token id as a string: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [
        None if e is None else
        {str(t): {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token} for t, lp in e.items()}
        for e in entries
    ]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int, as_ids: bool) -> list[ChatTokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries):
        sampled = entry[tid]
        if top_k < 0:  # all the entry holds (the whole vocabulary, or the chosen logprob_token_ids)
            ranked = sorted((lp.rank or 0, t, lp) for t, lp in entry.items())
        else:
            ranked = sorted((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k)[:top_k]
        top = [_top(t, lp, as_ids) for _, t, lp in ranked]
        out.append(ChatTokenLogprob(**_top(tid, sampled, as_ids).model_dump(), top_logprobs=top))
    return out


def _top(token_id: int, lp: Logprob, as_ids: bool) -> TopLogprob:
    text = _token(token_id, lp, as_ids)
    return TopLogprob(token=text, logprob=_value(lp), bytes=list((lp.decoded_token or "").encode("utf-8")))
