"""Memory sharing: what prefix caching, parallel sampling and beam search save.

    python -m benchmarks.sharing prefix     # 32 requests with one 1,024-token prefix: time with caching on vs off
    python -m benchmarks.sharing parallel   # n=4 sampling: peak KV blocks shared (fork + copy-on-write) vs 4 private copies
    python -m benchmarks.sharing beam       # beam_width=4: peak KV blocks vs 4 private greedy sequences per prompt

prefix: every request is the same "system prompt" of random token ids plus a
distinct random tail, greedy, ignore_eos. Two engines, one after the other in
this process (prefix caching on, then off), each timed on the same prompts
after the same warm-up; the greedy outputs of both are compared (in bfloat16
a few may part where rounding flips a near-tie; float32 should agree).
--repeat N keeps both engines up, alternates them with a new prefix per round
and keeps the best round of each: use it where other work shares the CPU.
With the default 2,048-token step budget the second request is admitted in
the same step as the first, before the prefix is cached, so it computes its
own copy; with --max-num-batched-tokens 1056 every later request shares the
first one's blocks.

parallel / beam: the peak of `num_used_blocks` over the engine's steps, with
sharing (SamplingParams(n=4) or beam search, prefix caching on) and without
(the same work as 4 independent n=1 requests per prompt, prefix caching off).
The KV pool must be large enough that nothing is preempted in either run;
the figures say whether that held.

Prompts are random token ids, so the work is the same whatever the model says.
Each sub-benchmark is a function (bench_prefix, bench_parallel, bench_beam)
that takes the model and the engine options, for tests and notebooks.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

from benchmarks.report import emit

# The PagedAttention paper (Kwon et al., SOSP 2023, section 6.3): memory saved
# by sharing, in percent, over its Alpaca and ShareGPT traces.
PAPER_SAVING_PCT = {"parallel": (6.1, 30.5), "beam": (37.6, 66.3)}



def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def shared_prefix_prompts(num_requests: int, prefix_len: int, tail_len: int, vocab: int, seed: int) -> list[dict]:
    """One random prefix, then a distinct random tail per request."""
    rng = random.Random(seed)
    prefix = random_ids(rng, prefix_len, vocab)
    return [{"prompt_token_ids": prefix + random_ids(rng, tail_len, vocab)} for _ in range(num_requests)]


def random_prompts(num_prompts: int, input_len: tuple[int, int], vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": random_ids(rng, rng.randint(*input_len), vocab)} for _ in range(num_prompts)]


def _engine_options(dtype: str, kv_cache_memory, engine_options: dict) -> dict:
    opts = dict(dtype=dtype, **engine_options)
    if kv_cache_memory is not None:
        opts["kv_cache_memory"] = kv_cache_memory
    return opts


def _dtype_name(llm) -> str:
    return llm.engine.dtype


def _warm_up(llm, vocab: int) -> None:
    """Two tiny requests with prompts unrelated to the workload, so one-time set-up is not timed."""
    from pagedllm import SamplingParams

    rng = random.Random(12345)
    prompts = [{"prompt_token_ids": random_ids(rng, 24, vocab)} for _ in range(2)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)


def _diff(before, after, *names: str) -> dict:
    return {name: getattr(after, name) - getattr(before, name) for name in names}


def _has_peak_counter(engine) -> bool:
    return hasattr(engine, "reset_peak_stats") and hasattr(engine.stats(), "peak_used_blocks")


def run_to_completion(engine, prompts: list[dict], params: list, use_tqdm: bool = False, desc: str = "") -> dict:
    """Add every request, step until all have finished, and record the peak of num_used_blocks after each step.

    peak_blocks is read between steps: blocks that a step allocates for
    requests that finish in that same step are already back in the pool when it
    is read. peak_used_blocks is the engine's own counter (EngineStats.peak_used_blocks,
    taken at every allocation, so it sees those too), or None on engines without it.
    """
    from tqdm.auto import tqdm

    has_counter = _has_peak_counter(engine)
    if has_counter:
        engine.reset_peak_stats()
    before = engine.stats()
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, params)]
    order = {rid: i for i, rid in enumerate(ids)}
    outputs: list = [None] * len(ids)
    peak = engine.stats().num_used_blocks
    bar = tqdm(total=len(ids), desc=desc, unit="req", dynamic_ncols=True, disable=not use_tqdm)
    t0 = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in order:
                    outputs[order[out.request_id]] = out
                    bar.update(1)
            peak = max(peak, engine.stats().num_used_blocks)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    errors = [o.error for o in outputs if o is None or o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed; first: {errors[0]}")
    after = engine.stats()
    return {
        "outputs": outputs,
        "peak_blocks": peak,
        "peak_used_blocks": after.peak_used_blocks if has_counter else None,
        "elapsed_s": elapsed,
        "end_used_blocks": after.num_used_blocks,
        **_diff(before, after, "num_preemptions", "num_steps", "generation_tokens_total"),
    }


# --- prefix ---------------------------------------------------------------

def _timed_generate(llm, prompts: list[dict], params, use_tqdm: bool) -> tuple[dict, list[list[int]]]:
    """One timed llm.generate: its figures (counters as deltas over this call) and the output token ids."""
    before = llm.stats()
    t0, m0 = time.perf_counter(), time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - t0
    # Until every request has its first token (the prompts; with caching on, the tails), then decode only.
    prefill_phase = max(o.metrics["first_token_time"] for o in outs) - m0
    d = _diff(before, llm.stats(), "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "num_steps")
    token_ids = [o.outputs[0].token_ids for o in outs]
    out_tokens = sum(len(t) for t in token_ids)
    assert out_tokens == len(prompts) * params.max_tokens, out_tokens
    fig = {
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "until_last_first_token_s": round(prefill_phase, 3),
        "after_last_first_token_s": round(elapsed - prefill_phase, 3),
        "prompt_tokens_computed": d["prefix_cache_queries"] - d["prefix_cache_hits"],
        "steps": d["num_steps"],
        "preemptions": d["num_preemptions"],
    }
    if llm.engine.config.enable_prefix_caching:
        fig.update(prefix_cache_queries=d["prefix_cache_queries"], prefix_cache_hits=d["prefix_cache_hits"],
                   prefix_cache_hit_rate=round(d["prefix_cache_hits"] / max(1, d["prefix_cache_queries"]), 4))
    return fig, token_ids


def bench_prefix(
    model: str | None = None,
    *,
    num_requests: int = 32,
    prefix_len: int = 1024,
    tail_len: int = 32,
    output_len: int = 64,
    dtype: str = "auto",
    kv_cache_memory=None,
    seed: int = 0,
    repeat: int = 1,
    use_tqdm: bool = True,
    **engine_options,
) -> dict:
    """Time the same shared-prefix workload with prefix caching on and off.

    repeat=1: one engine at a time (on, then off), the first freed before the
    second is built. repeat>1: both engines stay up and take turns (on/off,
    off/on, ...), each round with a new prefix so that caching never reuses an
    earlier round's blocks; the best (shortest) round of each counts, which
    keeps a noisy, shared machine from deciding the ratio.
    """
    from pagedllm import LLM, SamplingParams

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    opts = _engine_options(dtype, kv_cache_memory, engine_options)
    load_start = os.getloadavg()[0]
    llms: dict = {}
    rounds: dict[bool, list] = {True: [], False: []}  # per round: (figures, token ids)
    for r in range(repeat):
        for caching in ((True, False) if r % 2 == 0 else (False, True)):
            llm = llms.get(caching)
            if llm is None:
                llm = LLM(model, enable_prefix_caching=caching, **opts)
                vocab = llm.engine.model_config.vocab_size
                dtype_name, num_blocks = _dtype_name(llm), llm.engine.num_blocks
                _warm_up(llm, vocab)
            prompts = shared_prefix_prompts(num_requests, prefix_len, tail_len, vocab, seed + r)
            rounds[caching].append(_timed_generate(llm, prompts, params, use_tqdm))
            if repeat > 1:
                llms[caching] = llm
            llm = None  # with repeat=1: free this engine's weights and KV pool before the next one is built
            gc.collect()
    llms.clear()
    gc.collect()

    diverged = []
    for r, ((_, on_ids), (_, off_ids)) in enumerate(zip(rounds[True], rounds[False])):
        for i, (a, b) in enumerate(zip(on_ids, off_ids)):
            if a != b:
                k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                diverged.append({"round": r, "request": i, "first_differing_token": k} if repeat > 1 else
                                {"request": i, "first_differing_token": k})
    best = {c: min((f for f, _ in rounds[c]), key=lambda f: f["elapsed_s"]) for c in (True, False)}
    on, off = dict(best[True]), dict(best[False])
    if repeat > 1:
        on["elapsed_s_all"] = [f["elapsed_s"] for f, _ in rounds[True]]
        off["elapsed_s_all"] = [f["elapsed_s"] for f, _ in rounds[False]]
    total = num_requests * repeat
    return {
        "benchmark": "prefix",
        "dtype": dtype_name,
        "num_requests": num_requests,
        "prefix_len": prefix_len,
        "tail_len": tail_len,
        "output_len": output_len,
        "max_num_batched_tokens": opts.get("max_num_batched_tokens", 2048),
        "kv_blocks": num_blocks,
        "repeat": repeat,
        "caching_on": on,
        "caching_off": off,
        "speedup": round(off["elapsed_s"] / on["elapsed_s"], 2),
        "outputs_identical": not diverged,
        "num_identical_outputs": total - len(diverged),
        **({"diverged": diverged} if diverged else {}),
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


# --- parallel sampling ----------------------------------------------------

def _saving(shared: int, unshared: int) -> float:
    return round(100.0 * (1 - shared / unshared), 1) if unshared else 0.0


def bench_parallel(
    model: str | None = None,
    *,
    num_prompts: int = 8,
    input_len: tuple[int, int] = (200, 600),
    output_len: int = 64,
    n: int = 4,
    temperature: float = 0.8,
    dtype: str = "auto",
    kv_cache_memory=None,
    seed: int = 0,
    use_tqdm: bool = True,
    **engine_options,
) -> dict:
    """Peak KV blocks: SamplingParams(n) with prefix caching on vs n independent n=1 requests with caching off."""
    from pagedllm import LLM, SamplingParams

    opts = _engine_options(dtype, kv_cache_memory, engine_options)

    def sampling(**kw) -> SamplingParams:
        return SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True, **kw)

    # Prompt j's sample i has seed seed + j*n + i in both runs.
    llm = LLM(model, enable_prefix_caching=True, **opts)
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(num_prompts, input_len, vocab, seed)
    dtype_name, num_blocks, block_size = _dtype_name(llm), llm.engine.num_blocks, llm.engine.block_size
    shared = run_to_completion(llm.engine, prompts, [sampling(n=n, seed=seed + j * n) for j in range(num_prompts)],
                               use_tqdm, f"n={n}, shared")
    llm = None  # free this engine's weights and KV pool before the next one is built
    gc.collect()
    llm = LLM(model, enable_prefix_caching=False, **opts)
    flat = [p for p in prompts for _ in range(n)]
    unshared = run_to_completion(llm.engine, flat, [sampling(seed=seed + j * n + i) for j in range(num_prompts) for i in range(n)],
                                 use_tqdm, f"{n} x n=1, unshared")
    llm = None
    gc.collect()

    samples_shared = [c.token_ids for o in shared["outputs"] for c in o.outputs]
    samples_unshared = [o.outputs[0].token_ids for o in unshared["outputs"]]
    assert len(samples_shared) == len(samples_unshared) == num_prompts * n
    assert all(len(t) == output_len for t in samples_shared + samples_unshared)
    return {
        "benchmark": "parallel",
        "dtype": dtype_name,
        "num_prompts": num_prompts,
        "n": n,
        "prompt_tokens": [len(p["prompt_token_ids"]) for p in prompts],
        "output_len": output_len,
        "temperature": temperature,
        "seed": seed,
        "block_size": block_size,
        "kv_blocks": num_blocks,
        "peak_blocks_shared": shared["peak_blocks"],
        "peak_blocks_unshared": unshared["peak_blocks"],
        "saving_pct": _saving(shared["peak_blocks"], unshared["peak_blocks"]),
        **({"peak_used_blocks_shared": shared["peak_used_blocks"], "peak_used_blocks_unshared": unshared["peak_used_blocks"],
            "saving_pct_peak_used_blocks": _saving(shared["peak_used_blocks"], unshared["peak_used_blocks"])}
           if shared["peak_used_blocks"] is not None else {}),
        "paper_saving_pct": list(PAPER_SAVING_PCT["parallel"]),
        "preemptions_shared": shared["num_preemptions"],
        "preemptions_unshared": unshared["num_preemptions"],
        "no_preemptions": shared["num_preemptions"] == 0 and unshared["num_preemptions"] == 0,
        "all_blocks_freed": shared["end_used_blocks"] == 0 and unshared["end_used_blocks"] == 0,
        # Same seeds, so a sample and its independent twin agree unless rounding moved a draw.
        "identical_samples": sum(a == b for a, b in zip(samples_shared, samples_unshared)),
        "elapsed_s_shared": round(shared["elapsed_s"], 3),
        "elapsed_s_unshared": round(unshared["elapsed_s"], 3),
    }


# --- beam search ----------------------------------------------------------

def bench_beam(
    model: str | None = None,
    *,
    num_prompts: int = 8,
    input_len: tuple[int, int] = (200, 600),
    output_len: int = 64,
    beam_width: int = 4,
    dtype: str = "auto",
    kv_cache_memory=None,
    seed: int = 0,
    use_tqdm: bool = True,
    **engine_options,
) -> dict:
    """Peak KV blocks: LLM.beam_search (prefix caching on) vs beam_width private greedy n=1 requests per prompt (caching off)."""
    from pagedllm import LLM, BeamSearchParams, SamplingParams

    opts = _engine_options(dtype, kv_cache_memory, engine_options)
    llm = LLM(model, enable_prefix_caching=True, **opts)
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(num_prompts, input_len, vocab, seed)
    dtype_name, num_blocks = _dtype_name(llm), llm.engine.num_blocks
    before = llm.stats()
    params = BeamSearchParams(beam_width=beam_width, max_tokens=output_len, ignore_eos=True)
    if not _has_peak_counter(llm.engine):
        # beam_search runs to completion inside one call: only the engine can see its peak.
        raise RuntimeError("beam search needs EngineStats.peak_used_blocks and LLMEngine.reset_peak_stats() to measure its peak")
    llm.engine.reset_peak_stats()
    t0 = time.perf_counter()
    outs = llm.beam_search(prompts, params)
    elapsed = time.perf_counter() - t0
    peak = llm.stats().peak_used_blocks
    after = llm.stats()
    llm = None  # free this engine's weights and KV pool before the next one is built
    gc.collect()
    llm = LLM(model, enable_prefix_caching=False, **opts)
    flat = [p for p in prompts for _ in range(beam_width)]
    unshared = run_to_completion(llm.engine, flat, [SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)] * len(flat),
                                 use_tqdm, f"{beam_width} x greedy, unshared")
    llm = None
    gc.collect()
    peak_unshared = unshared["peak_used_blocks"]  # the same counter as the shared run's, not the between-steps peak
    assert len(outs) == num_prompts
    return {
        "benchmark": "beam",
        "dtype": dtype_name,
        "num_prompts": num_prompts,
        "beam_width": beam_width,
        "prompt_tokens": [len(p["prompt_token_ids"]) for p in prompts],
        "output_len": output_len,
        "kv_blocks": num_blocks,
        "peak_blocks_shared": peak,
        "peak_blocks_unshared": peak_unshared,
        "peak_source": "EngineStats.peak_used_blocks (taken at every allocation), both runs",
        "saving_pct": _saving(peak, peak_unshared),
        "paper_saving_pct": list(PAPER_SAVING_PCT["beam"]),
        "best_beam_output_tokens": [len(o.sequences[0].output_token_ids) if o.sequences else 0 for o in outs],
        "preemptions_shared": after.num_preemptions - before.num_preemptions,
        "preemptions_unshared": unshared["num_preemptions"],
        "no_preemptions": after.num_preemptions == before.num_preemptions and unshared["num_preemptions"] == 0,
        "elapsed_s_shared": round(elapsed, 3),
        "elapsed_s_unshared": round(unshared["elapsed_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["prefix", "parallel", "beam"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-memory", default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=32, help="prefix: requests sharing the prefix")
    ap.add_argument("--prefix-len", type=int, default=1024, help="prefix: shared prefix tokens")
    ap.add_argument("--tail-len", type=int, default=32, help="prefix: distinct tail tokens per request")
    ap.add_argument("--repeat", type=int, default=1, help="prefix: rounds per engine, taking turns; the best round counts")
    ap.add_argument("--num-prompts", type=int, default=8, help="parallel/beam: prompts")
    ap.add_argument("--input-len", type=parse_range, default=(200, 600), help="parallel/beam: prompt length range lo:hi")
    ap.add_argument("--n", type=int, default=4, help="parallel: samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.8, help="parallel: sampling temperature")
    ap.add_argument("--beam-width", type=int, default=4, help="beam: beams per prompt")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    common = dict(dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, seed=args.seed, output_len=args.output_len,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    if args.bench == "prefix":
        result = bench_prefix(args.model, num_requests=args.num_requests, prefix_len=args.prefix_len,
                              tail_len=args.tail_len, repeat=args.repeat, **common)
    elif args.bench == "parallel":
        result = bench_parallel(args.model, num_prompts=args.num_prompts, input_len=args.input_len, n=args.n,
                                temperature=args.temperature, **common)
    else:
        result = bench_beam(args.model, num_prompts=args.num_prompts, input_len=args.input_len,
                            beam_width=args.beam_width, **common)
    emit(result, args.json)


if __name__ == "__main__":
    main()
