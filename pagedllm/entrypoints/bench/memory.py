"""`pagedllm bench memory`: how full the KV memory really is, paged blocks against contiguous reservation.

The same workload runs twice in the same KV memory, all requests at once:
- paged: the engine as configured (blocks of --block-size tokens, taken as
  tokens arrive);
- contiguous: the same engine with block_size = max_model_len and prefix
  caching off, so every request takes one max_model_len-sized block when it
  is admitted and keeps it to the end, which is what a contiguous allocator
  that reserves the whole context per request does.
After every engine step we sample the KV utilization (token slots holding
tokens / token slots in allocated blocks, a shared block counted once), the
requests running and the blocks in use. Driving the engine step by step
(add_request / step) is the hook: the engine keeps no benchmark state.

A model with sliding-window layers runs a third time, in the same KV memory,
with every layer keeping every block (--disable-hybrid-kv-cache-manager):
the peak bytes in use of the two say what giving back the blocks that have
left every window saves.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass

from pagedllm.entrypoints.args import add_engine_args, engine_options
from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.bench.workload import Workload, add_workload_args, load_workload, workload_config

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KV_REQUESTS = 8  # the default pool holds 8 requests of max_model_len: memory, not seats, binds


@dataclass
class MemoryConfig:
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kv_cache_tokens: int | None = None  # None: DEFAULT_KV_REQUESTS * max_model_len (unless --kv-cache-memory)
    plot: str | None = None
    json: str | None = None
    progress: bool = True


@dataclass
class Trace:
    """One allocator's samples, one per engine step."""

    name: str
    block_size: int
    num_blocks: int
    kv_utilization: list[float]
    num_running: list[int]
    used_blocks: list[int]
    output_tokens: int
    preemptions: int
    bytes_per_block: int = 0
    sliding_window: int | None = None

    def summary(self) -> dict:
        busy = [u for u, b in zip(self.kv_utilization, self.used_blocks) if b]
        peak_blocks = max(self.used_blocks)
        at_peak = [u for u, b in zip(self.kv_utilization, self.used_blocks) if b == peak_blocks]
        return {
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "kv_cache_tokens": self.block_size * self.num_blocks,
            "steps": len(self.kv_utilization),
            "peak_kv_utilization": round(max(busy), 4),
            "mean_kv_utilization": round(statistics.fmean(busy), 4),
            # The steps where the most blocks are in use: how full memory is when it is the limit.
            "kv_utilization_at_peak_blocks": round(statistics.fmean(at_peak), 4),
            "max_running": max(self.num_running),
            "mean_running": round(statistics.fmean(self.num_running), 2),
            "peak_used_blocks": peak_blocks,
            "bytes_per_block": self.bytes_per_block,
            "peak_kv_bytes": peak_blocks * self.bytes_per_block,
            "output_tokens": self.output_tokens,
            "preemptions": self.preemptions,
        }


def add_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser, max_model_len=DEFAULT_MAX_MODEL_LEN)
    add_workload_args(parser, seed_flag=False)  # the engine's --seed seeds the workload too
    g = parser.add_argument_group("memory")
    g.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help=f"KV memory in tokens, for both allocators (default: {DEFAULT_KV_REQUESTS} x max_model_len; "
                        "or give --kv-cache-memory)")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="KV utilization and running requests per step, paged vs contiguous")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the figures (and the per-step samples) to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = MemoryConfig(args.max_model_len, args.kv_cache_tokens, args.plot, args.json)
    opts = engine_options(args)
    if cfg.kv_cache_tokens is not None and opts["kv_cache_memory"] is not None:
        raise ValueError("give the KV memory once: --kv-cache-tokens or --kv-cache-memory, not both")
    if opts["kv_cache_memory"] is None:
        tokens = cfg.kv_cache_tokens or DEFAULT_KV_REQUESTS * cfg.max_model_len
        if tokens < cfg.max_model_len:
            raise ValueError(f"--kv-cache-tokens {tokens} cannot hold one request of max_model_len {cfg.max_model_len}")
        opts["num_kv_blocks"] = tokens // args.block_size

    paged, workload = _trace("paged", opts, args, cfg.progress)
    tokens = paged.num_blocks * paged.block_size
    # The same memory (rounded down to whole contexts), reserved max_model_len tokens at a time.
    contiguous_opts = dict(opts, block_size=cfg.max_model_len, enable_prefix_caching=False,
                           num_kv_blocks=tokens // cfg.max_model_len, kv_cache_memory=None)
    contiguous, _ = _trace("contiguous", contiguous_opts, args, cfg.progress)

    traces = [paged, contiguous]
    p, c = paged.summary(), contiguous.summary()
    figures = {
        "max_model_len": cfg.max_model_len,
        "num_requests": len(workload),
        "paged": p,
        "contiguous": c,
        "running_ratio": round(p["max_running"] / c["max_running"], 2),
    }
    if paged.sliding_window is not None:
        full_opts = dict(opts, disable_hybrid_kv_cache_manager=True, num_kv_blocks=None,
                         kv_cache_memory=paged.num_blocks * paged.bytes_per_block)
        full, _ = _trace("full-attention KV", full_opts, args, cfg.progress)
        traces.append(full)
        f = full.summary()
        figures["full_attention_kv"] = f
        figures["sliding_window"] = paged.sliding_window
        figures["peak_kv_bytes_ratio"] = round(p["peak_kv_bytes"] / f["peak_kv_bytes"], 4)
    figures["samples"] = {t.name: {"kv_utilization": [round(u, 4) for u in t.kv_utilization], "num_running": t.num_running,
                                   "used_blocks": t.used_blocks} for t in traces}
    _print(figures)
    write_json(cfg.json, figures)
    if cfg.plot:
        from pagedllm.entrypoints.bench.plots import plot_memory

        plot_memory(paged, contiguous, cfg.plot, title=f"{len(workload)} requests, max_model_len {cfg.max_model_len}, "
                                                       f"KV memory {tokens} tokens")
        print(f"plot written to {cfg.plot}")
    return 0


def _trace(name: str, opts: dict, args: argparse.Namespace, progress: bool) -> tuple[Trace, Workload]:
    from tqdm.auto import tqdm

    from pagedllm.engine.engine import LLMEngine
    from pagedllm.sampling_params import SamplingParams

    engine = LLMEngine.from_options(**opts)
    engine.set_log_stats(True)  # every step's outputs carry the stats after that step
    workload = load_workload(workload_config(args), engine.model_config.vocab_size)
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(f"bench-{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    util, running, used = [], [], []
    output_tokens = 0
    with tqdm(total=len(workload), desc=f"{name} allocator", unit="req", disable=not progress, dynamic_ncols=True) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if out.finished:
                    output_tokens += len(out.outputs[0].token_ids)
                    bar.update(1)
            st = engine.last_stats
            util.append(st.kv_utilization)
            running.append(st.num_running)
            used.append(st.num_used_blocks)
    st = engine.stats()
    assert st.num_used_blocks == 0, f"{name}: {st.num_used_blocks} blocks still in use after the last request"
    trace = Trace(name, engine.config.block_size, st.num_blocks, util, running, used, output_tokens, st.num_preemptions,
                  engine.info.bytes_per_block, engine.model_config.sliding_window)
    engine.shutdown()
    del engine
    gc.collect()  # the next engine's KV pool takes this one's memory
    return trace, workload


def _print(figures: dict) -> None:
    p, c = figures["paged"], figures["contiguous"]
    rows: list = [("Requests", figures["num_requests"]), ("max_model_len", figures["max_model_len"]),
                  ("KV memory (tokens)", p["kv_cache_tokens"])]
    named = [("paged", p), ("contiguous", c)]
    if "full_attention_kv" in figures:
        named.append(("every layer keeps every block", figures["full_attention_kv"]))
    for name, s in named:
        rows += [
            (f"{name}: {s['num_blocks']} blocks x {s['block_size']} tokens", None),
            ("Peak KV utilization (%)", 100 * s["peak_kv_utilization"]),
            ("Mean KV utilization (%)", 100 * s["mean_kv_utilization"]),
            ("KV utilization at peak blocks in use (%)", 100 * s["kv_utilization_at_peak_blocks"]),
            ("Most requests running at once", s["max_running"]),
            ("Mean requests running", s["mean_running"]),
            ("Peak blocks in use", s["peak_used_blocks"]),
            ("Peak KV memory in use (MiB)", s["peak_kv_bytes"] / 2**20),
            ("Engine steps", s["steps"]),
            ("Preemptions", s["preemptions"]),
        ]
    rows += [("", None), ("Requests running at once, paged / contiguous", figures["running_ratio"])]
    if "peak_kv_bytes_ratio" in figures:
        rows.append((f"Peak KV memory, window {figures['sliding_window']} / every block kept", figures["peak_kv_bytes_ratio"]))
    print_table("KV Memory", rows)
