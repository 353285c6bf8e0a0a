"""What a quantized KV cache costs in quality, on natural text: log-likelihood of reference texts, and greedy outputs.

    python -m benchmarks.kv_quality --kv-cache-dtype int8 --json kv_quality.json

Two engines on the same weights (the embedded default model unless --model),
at the same --dtype, one with the model's own KV dtype ("auto") and one with
--kv-cache-dtype, one after the other:

  log-likelihood  benchmarks/data/kv_quality_texts.jsonl: each line a short
                  prompt (a title) and a reference text written for this
                  benchmark. The reference is fed after its prompt, teacher
                  forced, and its tokens' log-probabilities come back as
                  prompt logprobs (SamplingParams(prompt_logprobs=0)); reported:
                  the mean negative log-likelihood per reference token, the
                  perplexity, and the relative difference between the caches.
  greedy          benchmarks/data/kv_quality_prompts.jsonl: 48 natural
                  requests through the chat template, greedy, --max-tokens
                  each; reported: how many outputs are identical token for
                  token, and for the others, the mean first position where
                  they differ.

Every keys and values row of the quantized engine, the prompt's too, is read
back from the quantized pool: the figures are what the quantization changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pagedllm.entrypoints.bench.report import write_json  # noqa: E402
DATA = os.path.join(ROOT, "benchmarks", "data")


def _read(name: str) -> list[dict]:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(model: str | None, dtype: str, kv_cache_dtype: str, max_tokens: int) -> dict:
    from pagedllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory="512MiB")
    tok = llm.get_tokenizer()
    texts = _read("kv_quality_texts.jsonl")
    prompts, spans = [], []
    for item in texts:
        head = tok.encode(item["prompt"])
        ids = head + tok.encode(item["reference"], add_special_tokens=False)
        prompts.append({"prompt_token_ids": ids})
        spans.append((len(head), len(ids)))
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    per_text = []
    for out, (start, end) in zip(outs, spans):
        ids, plp = out.prompt_token_ids, out.prompt_logprobs
        per_text.append([plp[i][ids[i]].logprob for i in range(start, end)])
    chats = [[{"role": "user", "content": item["prompt"]}] for item in _read("kv_quality_prompts.jsonl")]
    greedy = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    info = llm.engine.info
    llm.engine.shutdown()
    return {"kv_cache_dtype": info.kv_cache_dtype, "logprobs": per_text, "greedy": [o.outputs[0].token_ids for o in greedy]}


def compare(base: dict, quant: dict) -> dict:
    nll = {}
    for name, run in (("base", base), ("quantized", quant)):
        tokens = [lp for text in run["logprobs"] for lp in text]
        mean = -sum(tokens) / len(tokens)
        nll[name] = {"nll_per_token": round(mean, 5), "perplexity": round(2.718281828459045**mean, 4), "tokens": len(tokens)}
    per_text = [(-sum(q) / len(q)) / (-sum(b) / len(b)) - 1 for b, q in zip(base["logprobs"], quant["logprobs"])]
    firsts = []
    for a, b in zip(base["greedy"], quant["greedy"]):
        if a != b:
            firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    n = len(base["greedy"])
    return {
        "log_likelihood": {**nll, "relative_difference": round(nll["quantized"]["nll_per_token"] / nll["base"]["nll_per_token"] - 1, 5),
                           "per_text_relative_difference": [round(x, 5) for x in per_text]},
        "greedy": {"prompts": n, "identical": n - len(firsts), "mean_first_difference": round(statistics.mean(firsts), 2) if firsts else None,
                   "first_differences": firsts, "output_tokens": [len(x) for x in base["greedy"]]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="int8")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    base = measure(args.model, args.dtype, "auto", args.max_tokens)
    quant = measure(args.model, args.dtype, args.kv_cache_dtype, args.max_tokens)
    figures = {"model": args.model or "default", "dtype": args.dtype, "base_kv": base["kv_cache_dtype"],
               "quantized_kv": quant["kv_cache_dtype"], **compare(base, quant)}
    shown = {k: v for k, v in figures.items() if k != "greedy"}
    shown["greedy"] = {k: v for k, v in figures["greedy"].items() if k not in ("first_differences", "output_tokens")}
    shown["log_likelihood"] = {k: v for k, v in figures["log_likelihood"].items() if k != "per_text_relative_difference"}
    print(json.dumps(shown, indent=2))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
