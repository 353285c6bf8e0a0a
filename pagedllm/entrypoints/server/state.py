"""What every route handler needs: the async engine, the names it serves under, the metrics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.entrypoints.server.errors import APIError
from pagedllm.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_names: list[str]  # the first is the name responses carry
    metrics: ServerMetrics
    api_key: str | None = None
    system_fingerprint: str | None = None  # fingerprint.py: the same for every response of this app
    tool_parser: str = "hermes"  # how this model writes tool calls (tool_parsers.choose_tool_parser)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise APIError(
            404, f"the model {name!r} does not exist on this server; it serves {', '.join(map(repr, self.model_names))}",
            "model", "model_not_found",
        )


def new_id(prefix: str) -> str:
    """A request id unique across the server (the engine's own counter is not shared with us)."""
    return f"{prefix}-{uuid.uuid4().hex}"
