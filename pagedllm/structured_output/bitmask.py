"""The step's grammar masks: which tokens each constrained row may sample, applied to its logits."""

from __future__ import annotations

import torch

from pagedllm.kernels.cpu import ops as cpu_ops


def apply_grammar_masks(logits: torch.Tensor, rows: list[tuple[int, object]]) -> dict[int, Exception]:
    """Set to -inf, in place, the logits of every token row i's grammar does not allow next.

    rows: (row of logits, GrammarState). A grammar that fails to fill its mask
    fails that row alone: its exception is returned by row, and its logits are left as they were.
    """
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)
    failed: dict[int, Exception] = {}
    filled = []
    for i, state in rows:
        try:
            state.fill_bitmask(bitmask, i)
            filled.append(i)
        except Exception as exc:
            failed[i] = exc
    if filled:
        if logits.dtype == torch.float32 and logits.stride(-1) == 1 and cpu_ops.available(logits):
            cpu_ops.apply_token_bitmask(logits, bitmask, filled)
            return failed
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=filled)
    return failed
