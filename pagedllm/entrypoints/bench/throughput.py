"""`pagedllm bench throughput`: offline throughput of pagedllm.LLM on a workload, optionally per concurrency.

All requests are handed to the engine at once and run to their output length
(greedy, ignore_eos), so requests/s and tokens/s measure the engine, not the
model's wish to stop. A concurrency sweep runs the same workload on one engine
with max_num_seqs set to each value in turn; the prefix cache is emptied
before every timed run, so no run reuses the prompts of the one before.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from pagedllm.entrypoints.args import add_engine_args, engine_options
from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.bench.workload import Workload, add_workload_args, load_workload, workload_config
from pagedllm.model.loader import default_model_name


@dataclass
class ThroughputConfig:
    concurrency: list[int] | None = None  # max_num_seqs values to sweep; None: one run at --max-num-seqs
    warmup: bool = True
    plot: str | None = None
    json: str | None = None
    progress: bool = True


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16,48, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency values must be integers >= 1, got {text!r}")
    return values


def add_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_workload_args(parser, seed_flag=False)  # the engine's --seed seeds the workload too
    g = parser.add_argument_group("throughput")
    g.add_argument("--concurrency", type=parse_concurrency, default=None, metavar="C1,C2,...",
                   help="sweep: run the workload once per value, with max_num_seqs set to it (e.g. 1,4,16,48)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the short untimed warm-up")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="with --concurrency: output tokens/s per concurrency")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = ThroughputConfig(args.concurrency, args.warmup, args.plot, args.json)
    if cfg.plot and not cfg.concurrency:
        raise ValueError("--plot draws throughput per concurrency: give --concurrency too (e.g. --concurrency 1,4,16,48)")
    from pagedllm import LLM

    opts = engine_options(args)
    t0 = time.perf_counter()
    model = opts.pop("model")
    llm = LLM(model, **opts)
    load_s = time.perf_counter() - t0
    workload = load_workload(workload_config(args), llm.engine.model_config.vocab_size)
    if cfg.warmup:
        warm_up(llm, workload)
    runs = []
    for c in cfg.concurrency or [args.max_num_seqs]:
        llm.engine.set_max_num_seqs(c)
        runs.append(run_once(llm, workload, cfg.progress, max_num_seqs=c))
    figures = {
        "model": model or default_model_name(),
        "dtype": llm.engine.dtype,
        "load_s": round(load_s, 2),
        "runs": runs,
    }
    _print(figures)
    write_json(cfg.json, figures)
    if cfg.plot:
        from pagedllm.entrypoints.bench.plots import plot_concurrency

        plot_concurrency(runs, cfg.plot, title=f"{_name(figures['model'])}, {len(workload)} requests, {figures['dtype']}")
        print(f"plot written to {cfg.plot}")
    return 0


def warm_up(llm, workload: Workload) -> None:
    """A few untimed steps, so that one-time set-up (allocations, kernel selection) is not timed."""
    from pagedllm import SamplingParams

    llm.generate(workload.prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)


def run_once(llm, workload: Workload, progress: bool = True, max_num_seqs: int | None = None) -> dict:
    """One timed pass over the workload; figures from the outputs and the engine's counters."""
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    llm.engine.reset_prefix_cache()  # nothing left over from the warm-up or an earlier run
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate(workload.prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - t0
    after = llm.stats()
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "max_num_seqs": max_num_seqs or llm.engine.config.max_num_seqs,
        "num_requests": len(outs),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "elapsed_s": round(elapsed, 6),
        "requests_per_s": round(len(outs) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 1),
        "preemptions": after.num_preemptions - before.num_preemptions,
        "steps": after.num_steps - before.num_steps,
        "prefix_cache_hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
    }


def _print(figures: dict) -> None:
    rows: list = [("Model", _name(figures["model"])), ("dtype", figures["dtype"]), ("Engine load (s)", figures["load_s"])]
    for r in figures["runs"]:
        if len(figures["runs"]) > 1:
            rows.append((f"max_num_seqs = {r['max_num_seqs']}", None))
        rows += [
            ("Requests", r["num_requests"]),
            ("Input tokens", r["input_tokens"]),
            ("Output tokens", r["output_tokens"]),
            ("Elapsed (s)", r["elapsed_s"]),
            ("Requests/s", r["requests_per_s"]),
            ("Output tokens/s", r["output_tokens_per_s"]),
            ("Total tokens/s", r["total_tokens_per_s"]),
            ("Preemptions", r["preemptions"]),
            ("Engine steps", r["steps"]),
        ]
    print_table("Offline Throughput", rows)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
