"""One decode step of the engine core at given batch sizes, in this process.

    python -m benchmarks.decode_step [--rows 1,12,48] [--steps 60] [--repeat 3] [--json FILE]

For each --rows value: an EngineCore on the default model (or --model) takes
that many random-token prompts of 32..384 tokens (seed 0) with room for
--steps more tokens each, prefills them, then times --steps pure decode steps
(greedy); ms per step, the median of --repeat passes (each pass a fresh set of
requests). What it isolates: the decode path (skinny products, decode
attention, fused element-wise kernels, Python between them), without the
prefill steps that dominate `pagedllm bench throughput`. Run it from two
source trees in turn (PYTHONPATH) to compare them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagedllm.entrypoints.bench.report import write_json


def time_decode(core, rows: int, steps: int, seed: int) -> float:
    """ms per decode step of `rows` sequences, after their prefill."""
    from pagedllm import SamplingParams
    from pagedllm.engine.messages import EngineCoreRequest

    rng = random.Random(seed)
    vocab = core.info.vocab_size
    for i in range(rows):
        prompt = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(32, 384))]
        core.add_request(EngineCoreRequest(f"decode-{seed}-{i}", prompt,
                                           SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)))
    while core.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running):
        core.step()  # prefill (and the first decode tokens of the early ones)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    elapsed = time.perf_counter() - t0
    while core.has_work():
        core.step()
    core.reset_prefix_cache()
    return elapsed / steps * 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rows", default="1,12,48", help="decode batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    from pagedllm.config import EngineConfig
    from pagedllm.engine.core import EngineCore

    core = EngineCore(EngineConfig(model=args.model, dtype=args.dtype))
    time_decode(core, 2, 4, seed=-1)  # warm-up: kernel builds, first allocations
    figures = {"model": args.model or "default", "dtype": core.info.dtype, "steps": args.steps, "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        runs = [time_decode(core, rows, args.steps, seed) for seed in range(args.repeat)]
        figures["rows"][str(rows)] = {"ms_per_step": round(statistics.median(runs), 2), "runs_ms": [round(r, 2) for r in runs]}
        print(f"{rows:3d} rows: {statistics.median(runs):7.2f} ms/step  (runs {', '.join(f'{r:.2f}' for r in runs)})", flush=True)
    core.shutdown()
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
