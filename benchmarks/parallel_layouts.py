"""The same workload at several process layouts of this host's cores: one engine with every core, tensor parallel
(one rank per share of the cores), data parallel (one engine core per share).

    python -m benchmarks.parallel_layouts --repeat 3 --json parallel_layouts.json

Each run is `pagedllm bench throughput` (the 48-request workload: random-token prompts of 32..384 tokens, outputs of
32..192, greedy, EOS ignored, seed 0; an untimed warm-up first) in a fresh process, the layouts one after the other
(never two at once), every layout once per round. A layout is "TPxDP"; with T cores here, each of the TP*DP
processes gets T/(TP*DP) threads. Reported: each layout's median output tokens/s with every run beside it, and its
ratio to the first layout's median.

The default model (SmolLM2-135M: 9 query heads over 3 KV heads) splits only at TP=3. `--heads 8,2` runs every layout
on a random-weight model of the same shape (layers, widths, head_dim, vocabulary) with 8 query heads over 2 KV
heads instead, which splits at TP=2; with ignore_eos the work per request is the same whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.compare_vllm import _cpu_name, median_run
from pagedllm.entrypoints.bench.report import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LAYOUTS = ("1x1", "2x1", "1x2")


def parse_layout(text: str) -> tuple[int, int]:
    try:
        tp, dp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a layout is TPxDP, e.g. 2x1 (tensor_parallel_size 2) or 1x2 (data_parallel_size 2); "
                         f"got {text!r}") from None
    if tp < 1 or dp < 1:
        raise ValueError(f"a layout's sizes are >= 1, got {text!r}")
    return tp, dp


def reshaped_model(heads: str, out_dir: str) -> str:
    """The default model's config with other head counts, as a random-weight model directory."""
    import transformers

    from pagedllm.model.loader import resolve_model
    from pagedllm.model.synthetic import build_model_dir

    q, kv = (int(x) for x in heads.split(","))
    config = transformers.AutoConfig.from_pretrained(resolve_model(None).path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = q, kv, head_dim
    return build_model_dir(os.path.join(out_dir, f"model-{q}-{kv}"), config, dtype="bfloat16")


def run_layout(layout: str, args: argparse.Namespace, log_dir: str) -> dict:
    tp, dp = parse_layout(layout)
    out = os.path.join(log_dir, f"{layout}-{sum(n.endswith('.json') for n in os.listdir(log_dir))}.json")
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "throughput", "--num-requests", str(args.num_requests),
           "--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp), "--json", out] + args.engine_args
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    with open(out + ".log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {layout} failed (exit {proc.returncode}); its log: {out}.log")
    with open(out) as f:
        run = json.load(f)["runs"][0]
    return {k: run[k] for k in ("output_tokens_per_s", "elapsed_s", "steps", "output_tokens")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                        help=f"TPxDP layouts, comma-separated; the first is the ratios' base (default {','.join(DEFAULT_LAYOUTS)})")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each layout's median is reported (default 3)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--heads", default=None, metavar="Q,KV",
                        help="run on a random-weight model of the default model's shape with these head counts")
    parser.add_argument("--json", default=None, metavar="FILE")
    args, args.engine_args = parser.parse_known_args(argv)  # the rest goes to `pagedllm bench throughput`
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    for layout in layouts:
        parse_layout(layout)
    log_dir = tempfile.mkdtemp(prefix="pagedllm-layouts-")
    if args.heads:
        args.engine_args += ["--model", reshaped_model(args.heads, log_dir)]
    runs: dict[str, list[dict]] = {layout: [] for layout in layouts}
    for r in range(args.repeat):
        for layout in layouts:
            run = run_layout(layout, args, log_dir)
            runs[layout].append(run)
            print(f"round {r + 1} {layout}: {run['output_tokens_per_s']} output tok/s ({run['elapsed_s']} s)", flush=True)
    summary = {}
    for layout in layouts:
        best = median_run(runs[layout], key=lambda run: run["output_tokens_per_s"])
        summary[layout] = {"output_tok_s": statistics.median(x["output_tokens_per_s"] for x in runs[layout]),
                           "steps": best["steps"]}
    base = summary[layouts[0]]["output_tok_s"]
    for s in summary.values():
        s["ratio"] = round(s["output_tok_s"] / base, 3)
    print(json.dumps(summary, indent=2))
    write_json(args.json, {"cpu": _cpu_name(), "repeat": args.repeat, "heads": args.heads, "engine_args": args.engine_args,
                           "summary": summary, "runs": runs, "logs": log_dir})
    return 0


if __name__ == "__main__":
    sys.exit(main())
