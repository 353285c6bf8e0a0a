"""Where pagedllm keeps what it builds once and reuses: converted models, compiled kernels."""

from __future__ import annotations

import os


def cache_root() -> str:
    """$PAGEDLLM_CACHE_DIR, $XDG_CACHE_HOME/pagedllm, or ~/.cache/pagedllm."""
    if os.environ.get("PAGEDLLM_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["PAGEDLLM_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(xdg), "pagedllm")
