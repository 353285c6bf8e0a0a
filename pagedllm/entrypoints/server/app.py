"""The FastAPI app: OpenAI's routes over one engine, plus health, tokenizer and metrics routes.

build_app wraps a loaded LLMEngine (whose core runs in its own process); the
app starts the output thread of its AsyncLLMEngine when it starts and stops it
when it stops, so one LLMEngine can serve several apps in turn (as the tests
do). With an API key, every route but /health and /metrics
needs `Authorization: Bearer <key>`: probes and scrapers stay simple, and
neither reveals text.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

import pagedllm

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.entrypoints.server.cors import CorsSettings, add_cors
from pagedllm.entrypoints.server.errors import APIError, bad_request, install_error_handlers
from pagedllm.entrypoints.server.fingerprint import system_fingerprint
from pagedllm.entrypoints.server.openapi import error_responses, install_openapi
from pagedllm.entrypoints.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)
from pagedllm.entrypoints.server.serving_chat import create_chat_completion
from pagedllm.entrypoints.server.serving_completions import create_completion
from pagedllm.entrypoints.server.state import ServerState
from pagedllm.entrypoints.server.tool_parsers import choose_tool_parser
from pagedllm.entrypoints.server.streaming import ClientDisconnected
from pagedllm.entrypoints.server.unicode_check import check_unicode
from pagedllm.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)


def build_app(
    engine, served_model_names: list[str] | None = None, api_key: str | None = None, log_interval: float = 5.0,
    cors: CorsSettings | None = None, tool_call_parser: str | None = None,
) -> FastAPI:
    """An app serving `engine` (a loaded LLMEngine) under `served_model_names` (default: its path).

    cors: which web pages may call it from a browser (default: local pages only; cors.py).
    tool_call_parser: the format the model writes tool calls in (hermes, llama3_json, mistral); None: read from its chat template.
    """
    names = list(served_model_names or [engine.model_path])
    metrics = ServerMetrics(names[0])
    parser = choose_tool_parser(getattr(engine.tokenizer, "chat_template", None), tool_call_parser)
    state = ServerState(AsyncLLMEngine(engine, observer=metrics, log_interval=log_interval), names, metrics, api_key or None,
                        system_fingerprint(engine), tool_parser=parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    add_cors(app, cors)

    # Dependencies are coroutines: FastAPI would run plain functions in its thread pool, a thread hop per request.
    async def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            why = "no API key was given" if not given else "the API key is wrong"
            raise APIError(401, f"{why}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def require_valid_unicode(request: Request) -> None:
        check_unicode(await request.body())

    async def require_engine() -> None:
        if not state.engine.is_running:
            raise APIError(503, state.engine.unavailable_reason(), code="engine_unavailable")

    open_routes = APIRouter()
    guarded = APIRouter(dependencies=[Depends(require_key), Depends(require_valid_unicode), Depends(require_engine)])

    def generation(model, chunk) -> dict:
        ok = {"model": model, "description": "The completion; with stream true, Server-Sent Events of chunks "
              f"({chunk.__name__}) ending with 'data: [DONE]'.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
        return {200: ok, **error_responses(400, 401, 404, 500, 503)}

    @open_routes.get("/health", responses={200: {"description": "The engine is running."}, **error_responses(503)})
    async def health():
        await require_engine()
        return JSONResponse({"status": "ok"})

    @open_routes.get("/metrics", response_class=PlainTextResponse,
                     responses={200: {"description": "Prometheus metrics, in its text exposition format."}})
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @guarded.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
    async def models():
        cards = [ModelCard(id=n, root=engine.model_path, max_model_len=state.max_model_len) for n in names]
        return ModelList(data=cards)

    @guarded.post("/v1/completions", responses=generation(CompletionResponse, CompletionResponse))
    async def completions(body: CompletionRequest, raw: Request):
        return await _disconnect_safe(create_completion(state, body, raw))

    @guarded.post("/v1/chat/completions", responses=generation(ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await _disconnect_safe(create_chat_completion(state, body, raw))

    @guarded.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 503))
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if body.prompt is not None and body.content is not None:
            raise bad_request("give the text once, as prompt (vLLM's name) or content (llama.cpp's)", "content")
        prompt, llama_style = (body.content, True) if body.content is not None else (body.prompt, False)
        if (prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages (content, llama.cpp's name, counts as prompt)", "prompt")
        if prompt is not None:
            # vLLM adds special tokens unless told not to; llama.cpp's content adds none unless add_special.
            special = body.add_special if body.add_special is not None else body.add_special_tokens
            tokens = state.tokenizer.encode(prompt, add_special_tokens=special if special is not None else not llama_style)
        else:
            try:
                tokens = apply_chat_template(state.tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt is not False)
            except ValueError as exc:
                raise bad_request(str(exc), "messages") from None
        tokens = [int(t) for t in tokens]
        shown = [TokenPiece(id=t, piece=state.tokenizer.decode([t])) for t in tokens] if body.with_pieces else tokens
        return TokenizeResponse(tokens=shown, count=len(tokens), max_model_len=state.max_model_len)

    @guarded.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 503))
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range: token ids must be in [0, {vocab})", "tokens")
        text = state.tokenizer.decode(body.tokens)
        return DetokenizeResponse(prompt=text, content=text)

    # The same endpoints without /v1, as llama.cpp's server answers them: clients configured with a base URL
    # that lacks /v1 work too. Left out of the OpenAPI document, which names each endpoint once.
    guarded.add_api_route("/models", models, methods=["GET"], include_in_schema=False)
    guarded.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    guarded.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    app.include_router(open_routes)
    app.include_router(guarded)
    return app


async def _disconnect_safe(work) -> Response:
    try:
        return await work
    except ClientDisconnected:
        # Nobody is there to read an answer; 499 (nginx's "client closed request") shows in logs.
        return Response(status_code=499)
