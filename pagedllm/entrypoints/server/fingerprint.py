"""system_fingerprint: one short string that changes when what answers changes.

OpenAI sends it so that clients can tell when the backend changed under the
same model name (outputs may differ even with a seed). Here it is a hash of
what decides the numbers: pagedllm's version, the model's path, its dtype,
the KV cache's dtype and the context length. It is computed once per app.
"""

from __future__ import annotations

import hashlib

import pagedllm


def system_fingerprint(engine) -> str:
    """`fp_` and 10 hex digits, stable for one engine set-up (an LLMEngine)."""
    config = getattr(engine, "config", None)
    parts = (
        pagedllm.__version__, str(engine.model_path), str(getattr(engine, "dtype", "")),
        str(getattr(config, "kv_cache_dtype", "")), str(engine.max_model_len),
    )
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]
