"""Server-Sent Events, several engine streams as one, and stopping work for clients that left.

A client that disconnects must not keep the engine busy: its request is
aborted at once, which frees its KV blocks before the next step. Starlette
notices a vanished client only when it next writes to it (ASGI 2.4) or by
listening for the disconnect message (older servers); EventStreamResponse
always listens, and closes the event source when the client goes, so the
request is aborted even while it waits in the queue and sends nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.outputs import RequestOutput

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """One event in OpenAI's stream format."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


@dataclass
class Progress:
    """How much of one completion a stream has sent so far."""

    chars: int = 0
    tokens: int = 0
    text_offset: int = 0  # for legacy logprobs' text_offset
    done: bool = False  # its finish_reason went out: with n > 1 it rides along until its siblings end
    tool_calls: object = None  # chat with tools: its serving_tools.StreamedCalls


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """text/event-stream that stops, and closes its source, the moment the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await _wait_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            # Cancelled mid-await, the source has run its cleanup already; closing
            # it again is harmless, and covers a source that never started.
            await self.body_iterator.aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, but cancel it (aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if not task.done():
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return task.result()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests' streams, in the order outputs arrive.

    Closing the merged stream closes (so aborts) every request still running.
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, end))
        except Exception as exc:  # e.g. the engine died: hand it to the reader
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # a cancelled pump closes its stream, which aborts the request
