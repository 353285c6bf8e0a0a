"""Serving figures from per-request records, defined as vLLM's benchmark_serving defines them.

- TTFT: from sending the request to the first streamed chunk with a choice.
- TPOT, per request with more than one output token: (e2e - ttft) / (output_tokens - 1).
- ITL: every gap between consecutive chunks of a stream, all requests pooled.
- E2E latency: from sending the request to its last chunk with a choice.
- Throughputs: completed requests, and their output tokens (counted by the
  server's usage, not by chunks), over the wall time of the whole run.
Each latency is reported as mean, median and p99 (numpy's percentile), in ms.
Failed requests count in `failed` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    success: bool = False
    prompt_tokens: int = 0  # from the server's usage
    output_tokens: int = 0  # from the server's usage
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, to the last chunk
    itl: list[float] = field(default_factory=list)  # seconds between consecutive chunks
    error: str = ""


def summarize(records: list[RequestRecord], duration: float) -> dict:
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    figures = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": round(duration, 6),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        ms = np.asarray(values, dtype=float) * 1000
        figures[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else None
        figures[f"median_{name}_ms"] = float(np.median(ms)) if ms.size else None
        figures[f"p99_{name}_ms"] = float(np.percentile(ms, 99)) if ms.size else None
    errors = [r.error for r in records if not r.success]
    figures["errors"] = sorted(set(errors))[:10]  # distinct messages, a few
    return figures
