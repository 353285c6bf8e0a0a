"""Why the engine core has a process of its own: the same workload stepped on the thread that built the model, and on another.

    python -m benchmarks.engine_thread --repeat 3

The server used to build the engine on its main thread and step it on a
thread of its own, beside the event loop. This runs the 48-request workload
of `pagedllm bench` through an engine whose core is in this process
(core_process=False), built on the main thread, and times LLM.generate in
turn on the main thread ("main") and on a second thread ("thread"), with
nothing else running: no HTTP, no event loop. Each run is preceded by an
untimed warm-up on the same thread, and the prefix cache is emptied before
each run. Medians over --repeat rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from pagedllm.entrypoints.bench.report import write_json

from pagedllm.entrypoints.bench.workload import make_workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)

    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, core_process=False)
    prompts, lens = make_workload(args.num_requests, (32, 384), (32, 192), llm.engine.model_config.vocab_size, 0)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def run(into: list) -> None:
        llm.generate(prompts[:2], warm, use_tqdm=False)
        llm.engine.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        into.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))

    rates: dict[str, list[float]] = {"main": [], "thread": []}
    for r in range(args.repeat):
        run(rates["main"])
        t = threading.Thread(target=run, args=(rates["thread"],))
        t.start()
        t.join()
        print(f"round {r + 1}: main {rates['main'][-1]:.1f}, thread {rates['thread'][-1]:.1f} output tok/s", file=sys.stderr)
    figures = {side: {"median_tok_s": round(statistics.median(v), 1), "runs_tok_s": [round(x, 1) for x in v]}
               for side, v in rates.items()}
    figures["thread_over_main"] = round(figures["thread"]["median_tok_s"] / figures["main"]["median_tok_s"], 3)
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
