"""Token ids -> text, one token at a time, with stop strings.

Decoding each new token alone is wrong twice over: a byte-level BPE token can
hold part of a multi-byte character (emoji, CJK), and SentencePiece drops the
leading space of the first token it decodes. So, as vLLM does, each step
decodes a short window of recent tokens: `prefix_offset..read_offset` is text
already emitted (context only), and the new text is whatever the window adds
beyond it. Text is emitted only once it no longer ends in U+FFFD, that is once
the character is complete. Each step costs two decodes of a few tokens,
whatever the length of the output.

Plain Python on purpose: engine/ does not import torch.
"""

from __future__ import annotations

from typing import Any, Sequence

from pagedllm.sampling_params import SamplingParams

# Prompt tokens decoded as left context for the first output tokens, so the
# first generated word keeps its leading space (vLLM uses about as many).
_PROMPT_CONTEXT = 6
# Drop consumed ids from the window list once this many have piled up.
_TRIM_AT = 4096
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._hold_back = params.stop_str_hold_back
        self._min_tokens = params.min_tokens

        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # A prompt cut inside a character would glue its bytes to the output's.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids = context  # window source: context, then every output id
        self._prefix_offset = 0
        self._read_offset = len(context)

        self._text = ""
        self._num_tokens = 0
        self._stop_checked = 0  # text before this offset has been searched for stops
        self._emitted = 0  # chars handed out by new_text()
        self._flushed = False
        self.stop_str: str | None = None  # the stop string that ended the output

    @property
    def text(self) -> str:
        """Output text so far: complete characters only until finish()."""
        return self._text

    @property
    def stream_text(self) -> str:
        """Text that may be shown now: all of it once finished; before that, less the
        last len(longest stop) - 1 chars, where a stop string could still start and be cut."""
        if self.finished or not self._hold_back:
            return self._text
        return self._text[: max(0, len(self._text) - self._hold_back)]

    @property
    def finished(self) -> bool:
        return self.stop_str is not None or self._flushed

    def append(self, token_id: int) -> str | None:
        """Add one generated token. Returns the stop string if one now
        matches; the text then ends before it (or after it, with
        include_stop_str_in_output) and no more tokens may be appended."""
        if self.finished:
            why = f"stop string {self.stop_str!r} matched" if self.stop_str else "finish() was called"
            raise RuntimeError(f"append({token_id}) after the output finished: {why}")
        self._ids.append(token_id)
        self._num_tokens += 1
        self._text += self._decode_next()

        # As vLLM: stops count only from min_tokens on; text before that is
        # passed over, though a match may still reach back into it.
        if self._num_tokens < self._min_tokens or not self._stops:
            self._stop_checked = len(self._text)
            return None
        if len(self._text) > self._stop_checked:
            self._check_stops()
        return self.stop_str

    def new_text(self, finished: bool = False) -> str:
        """Text added since the last call, for streaming. Keeps back the last
        len(longest stop) - 1 chars while a stop string could still start
        there and be cut; pass finished=True on the last call to get the rest."""
        if finished:
            self.finish()
        visible = self.stream_text
        if len(visible) <= self._emitted:
            return ""
        out = visible[self._emitted:]
        self._emitted = len(visible)
        return out

    def finish(self) -> None:
        """End of output for any reason: add what pending bytes decode to
        (U+FFFD for a cut character, as a full decode would), so that text
        equals tokenizer.decode(output_ids). Idempotent."""
        if self.finished:
            return
        self._flushed = True
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            self._text += full[len(prefix):]

    # -- internals ---------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)

    def _decode_next(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # nothing yet, or a character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return full[len(prefix):]

    def _check_stops(self) -> None:
        """Earliest stop string that ends in the new text (it may begin
        earlier, up to len(stop) - 1 chars back)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            i = self._text.find(stop, max(0, self._stop_checked - len(stop) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        self._stop_checked = len(self._text)
        if best is not None:
            i, stop = best
            self._text = self._text[:i + len(stop) if self._include_stop else i]
            self.stop_str = stop


def decode_token(tokenizer: Any, token_id: int, cache: dict[int, str] | None = None) -> str:
    """One token's own text, special tokens included, for logprob entries.

    Pass a cache owned by the caller (the engine keeps one per tokenizer):
    logprobs ask for up to 21 tokens per row per step, mostly the same ones."""
    text = cache.get(token_id) if cache is not None else None
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if cache is not None:
            cache[token_id] = text
    return text
