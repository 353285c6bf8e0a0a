"""Dummy-weight runs of real model shapes: pagedllm against transformers' generate, on the same weights.

    python -m benchmarks.model_families --dir /tmp/shapes --json model_families.json \
        [--shapes gemma-2-2b,gemma-3-1b,phi-3.5-mini,qwen3-30b-a3b] [-- extra compare_hf.py flags]

For each shape of benchmarks/model_shapes.py, at the layer count that fits
this machine, the model directory is written once (transformers' random
initialisation, saved), then benchmarks/compare_hf.py runs on it in a process
of its own with --sides pagedllm,static: pagedllm's LLM.generate and
transformers' generate in static batches, one after the other, on one small
workload (16 requests, prompts 32..128, outputs 32..64, float32 unless the
extra flags say otherwise). The figures of every shape are gathered in --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_SHAPES = "gemma-2-2b,gemma-3-1b,phi-3.5-mini,qwen3-30b-a3b"
WORKLOAD = ["--num-requests", "16", "--input-len", "32:128", "--output-len", "32:64", "--dtype", "float32",
            "--sides", "pagedllm,static", "--batch-size", "16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the model directories are written (reused when present)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--json", default=None)
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = {}
    for name in args.shapes.split(","):
        path = os.path.join(args.dir, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            subprocess.run([sys.executable, "-m", "benchmarks.model_shapes", "write", name, path], check=True)
        out = os.path.join(args.dir, f"{name}.json")
        cmd = [sys.executable, "-m", "benchmarks.compare_hf", "--model", path, *WORKLOAD, *extra, "--json", out]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(out) as f:
            results[name] = json.load(f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
