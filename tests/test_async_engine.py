"""The async engine on the tiny model: streams, joining a running batch, aborts, shutdown, observer hooks."""

from __future__ import annotations

import asyncio
import random
from contextlib import aclosing

import pytest

from pagedllm import LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineObserver


class Recorder(EngineObserver):
    def __init__(self):
        self.first_tokens, self.inter_tokens, self.finished = 0, 0, []

    def on_first_token(self, seconds):
        self.first_tokens += 1

    def on_inter_token(self, seconds):
        self.inter_tokens += 1

    def on_request_finished(self, summary):
        self.finished.append(summary)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 49000) for _ in range(rng.randint(4, 40))]} for _ in range(n)]


def run(coro, timeout: float = 60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def gather(*coros):
    return await asyncio.gather(*coros)


async def collect(aengine: AsyncLLMEngine, prompt, params, rid: str):
    last = None
    async for out in aengine.generate(aengine.make_request(prompt, params, rid)):
        last = out
    return last


def test_concurrent_streams_give_the_offline_tokens(engine):
    ps = prompts(8, seed=1)
    reference = []
    for i, p in enumerate(ps):  # offline, through the plain engine
        engine.add_request(f"ref-{i}", p, greedy(10))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    reference = [done[f"ref-{i}"] for i in range(len(ps))]

    recorder = Recorder()
    aengine = AsyncLLMEngine(engine, observer=recorder)
    aengine.start()
    try:
        outs = run(gather(*(collect(aengine, p, greedy(10), f"a-{i}") for i, p in enumerate(ps))))
    finally:
        aengine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert recorder.first_tokens == 8 and recorder.inter_tokens == 8 * 9
    assert sorted(s.request_id for s in recorder.finished) == sorted(f"a-{i}" for i in range(8))
    assert all(s.num_output_tokens == 10 and s.time_to_first_token is not None for s in recorder.finished)
    st = aengine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_running == 0


def test_a_request_that_arrives_later_joins_the_running_batch(engine):
    aengine = AsyncLLMEngine(engine)
    aengine.start()

    async def scenario():
        order = []
        long_req = aengine.make_request(prompts(1, seed=2)[0], greedy(150), "long")
        async with aclosing(aengine.generate(long_req)) as stream:
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            # "long" is mid-run: a new request must finish while it still runs.
            short = asyncio.ensure_future(collect(aengine, prompts(1, seed=3)[0], greedy(4), "short"))
            async for out in stream:
                if short.done() and "short" not in order:
                    order.append("short")
                if out.finished:
                    order.append("long")
        await short
        return order

    try:
        order = run(scenario())
    finally:
        aengine.shutdown()
    assert order == ["short", "long"]


def test_closing_a_stream_aborts_its_request_and_frees_its_blocks(engine):
    recorder = Recorder()
    aengine = AsyncLLMEngine(engine, observer=recorder)
    aengine.start()

    async def scenario():
        req = aengine.make_request(prompts(1, seed=4)[0], greedy(400), "gone")
        async with aclosing(aengine.generate(req)) as stream:
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 2:
                    break  # the caller walks away; aclosing closes the stream
        for _ in range(500):
            if recorder.finished:
                break
            await asyncio.sleep(0.01)

    try:
        run(scenario())
    finally:
        aengine.shutdown()
    assert [(s.request_id, s.finish_reason) for s in recorder.finished] == [("gone", "abort")]
    assert recorder.finished[0].num_output_tokens < 400
    st = aengine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_running == st.num_waiting == 0


def test_the_event_loop_keeps_running_while_the_engine_steps(engine):
    aengine = AsyncLLMEngine(engine)
    aengine.start()

    async def scenario():
        ticks = 0
        work = asyncio.ensure_future(asyncio.gather(*(collect(aengine, p, greedy(60), f"t-{i}") for i, p in enumerate(prompts(4, 5)))))
        while not work.done():
            await asyncio.sleep(0.005)
            ticks += 1
        await work
        return ticks

    try:
        ticks = run(scenario())
    finally:
        aengine.shutdown()
    assert ticks >= 5  # the loop was free between steps, not blocked for the whole run


def test_shutdown_ends_requests_in_flight_and_refuses_new_ones(engine):
    aengine = AsyncLLMEngine(engine)
    aengine.start()

    async def scenario():
        outs = []
        async for out in aengine.generate(aengine.make_request(prompts(1, seed=6)[0], greedy(400), "late")):
            outs.append(out)
            if len(outs) == 2:
                await asyncio.get_running_loop().run_in_executor(None, aengine.shutdown)
        return outs[-1]

    last = run(scenario())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert not aengine.is_running

    async def after():
        async for _ in aengine.generate(aengine.make_request("hello", greedy(2), "refused")):
            pass

    with pytest.raises(EngineDeadError, match="shutting down"):
        run(after())
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and not engine.has_unfinished_requests()


def test_a_bad_request_fails_its_stream_only(engine):
    aengine = AsyncLLMEngine(engine)
    aengine.start()

    async def scenario():
        # Long enough that "dup" is still running when the second one comes (a core process is quick).
        a = aengine.make_request("one", greedy(200), "dup")
        b = aengine.make_request("two", greedy(3), "dup")
        first = asyncio.ensure_future(collect_req(a))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in use"):
            await collect_req(b)
        return await first

    async def collect_req(req):
        last = None
        async for out in aengine.generate(req):
            last = out
        return last

    try:
        out = run(scenario())
    finally:
        aengine.shutdown()
    assert out.finished and out.outputs[0].finish_reason == "length"
