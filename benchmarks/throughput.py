"""Offline throughput on a random-token workload.

    python benchmarks/throughput.py --num-requests 48 --input-len 32:384 --output-len 32:192 --dtype bfloat16

Prompts are random token ids and every request runs to its output length
(ignore_eos), greedy, so the work is the same whatever the model says.
"""

from __future__ import annotations

import argparse
import random
import time

from report import emit  # benchmarks/ is on sys.path when a script runs


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        prompts.append({"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(rng.randint(*input_len))]})
        outputs.append(rng.randint(*output_len))
    return prompts, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--input-len", type=parse_range, default=(32, 384))
    ap.add_argument("--output-len", type=parse_range, default=(32, 192))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-memory", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    from pagedllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory)
    load_s = time.perf_counter() - t0
    vocab = llm.engine.model_config.vocab_size
    prompts, out_lens = make_workload(args.num_requests, args.input_len, args.output_len, vocab, args.seed)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    # Warm-up: a few steps so that one-time kernel set-up is not timed.
    llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    assert out_tokens == sum(out_lens)
    st = llm.stats()
    result = {
        "dtype": str(llm.engine.dtype).replace("torch.", ""),
        "num_requests": len(prompts),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 1),
        "load_s": round(load_s, 2),
        "preemptions": st.num_preemptions,
        "steps": st.num_steps,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
