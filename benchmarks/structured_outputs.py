"""Structured outputs on the default model: does every schema parse, what do grammars cost, do new ones stall others?

    python -m benchmarks.structured_outputs schemas [--json F]
        20 pydantic models (structured_schemas.py) through `pagedllm serve`'s API with the openai
        client's beta.chat.completions.parse, sent at once: how many come back parsed.
    python -m benchmarks.structured_outputs throughput [--repeat 3] [--json F]
        The 48-request workload of `pagedllm bench throughput` (random-token prompts 32..384,
        outputs 32..192, greedy), plain and with every request under a JSON schema whose
        output never ends early (so both sides produce the same tokens); each side in its own
        process, in turn; medians of output tokens/s and their ratio.
    python -m benchmarks.structured_outputs itl [--json F]
        16 running requests, their inter-token latency (the time between one step's outputs and
        the next) with nothing arriving, while 20 plain requests arrive one every few steps, and
        while 20 requests with new schemas arrive the same way: p50 and p99. Compiles run beside
        the steps, so the last should be close to the second.
    python -m benchmarks.structured_outputs masks [--json F]
        One step's grammar work for 48 rows: filling the bitmasks, applying them (our kernel, xgrammar's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from pagedllm.entrypoints.bench.report import write_json

WORKLOAD = dict(n=48, input_len=(32, 384), output_len=(32, 192), seed=0)


def _items_schema(i: int) -> dict:
    """A schema no output of the workload's lengths can complete (at least 400 items), so that max_tokens ends
    every request, as ignore_eos does on the plain side, and both sides make the same tokens; 8 distinct ones."""
    return {"type": "object", "properties": {f"list{i % 8}": {"type": "array", "minItems": 400, "items": {
        "type": "object", "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["word", "n"]}}}, "required": [f"list{i % 8}"]}


def side(kind: str) -> dict:
    """One timed pass of the workload in this process (plain or json)."""
    from pagedllm import LLM, SamplingParams, StructuredOutputsParams
    from pagedllm.entrypoints.bench.workload import make_workload

    llm = LLM()
    vocab = llm.engine.model_config.vocab_size
    prompts, output_lens = make_workload(WORKLOAD["n"], WORKLOAD["input_len"], WORKLOAD["output_len"], vocab, WORKLOAD["seed"])
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    params = []
    for i, n in enumerate(output_lens):
        so = StructuredOutputsParams(json=_items_schema(i)) if kind == "json" else None
        params.append(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, structured_outputs=so))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    reasons = sorted({o.outputs[0].finish_reason for o in outs})
    return {"kind": kind, "elapsed_s": round(elapsed, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 1), "finish_reasons": reasons}


def throughput(repeat: int) -> dict:
    runs = {"plain": [], "json": []}
    for r in range(repeat):
        for kind in ("plain", "json") if r % 2 == 0 else ("json", "plain"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.structured_outputs", "_side", kind],
                                 capture_output=True, text=True, check=True)
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            runs[kind].append(fig)
            print(f"round {r + 1} {kind}: {fig['output_tokens_per_s']} tok/s ({fig['output_tokens']} tokens, {fig['elapsed_s']} s)",
                  flush=True)
    med = {k: statistics.median(f["output_tokens_per_s"] for f in v) for k, v in runs.items()}
    return {"runs": runs, "median_output_tokens_per_s": med, "json_over_plain": round(med["json"] / med["plain"], 3)}


def itl(rounds: int) -> dict:
    import random

    from pagedllm import LLMEngine, SamplingParams, StructuredOutputsParams
    from pagedllm.config import EngineConfig

    engine = LLMEngine(EngineConfig(None))
    rng = random.Random(0)
    # The same 20 arrivals without a grammar show what the extra requests cost by themselves.
    phases = {"no arrivals": [], "20 new requests, no grammar": [], "20 new schemas": []}
    for r in range(rounds):
        for phase in phases if r % 2 == 0 else reversed(list(phases)):
            arrivals = 0 if phase == "no arrivals" else 20
            for i in range(16):
                prompt = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(64)]}
                engine.add_request(f"{r}-{phase}-{i}", prompt, SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
            gaps, last, step = [], None, 0
            while engine.has_unfinished_requests():
                if arrivals and step % 4 == 3:  # a request with a schema never seen before
                    k = f"{r}-{arrivals}-{time.time_ns()}"
                    schema = {"type": "object", "properties": {f"f{k}_{j}": {"type": "string", "maxLength": 6} for j in range(12)},
                              "required": [f"f{k}_0"]}
                    so = StructuredOutputsParams(json=schema) if phase == "20 new schemas" else None
                    engine.add_request(f"s{k}", {"prompt_token_ids": [5, 6, 7]},
                                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=so is None, structured_outputs=so))
                    arrivals -= 1
                outs = engine.step()
                step += 1
                now = time.perf_counter()
                if any(o.request_id.startswith(f"{r}-") and o.outputs and o.outputs[0].token_ids for o in outs):
                    if last is not None:
                        gaps.append(now - last)
                    last = now
            phases[phase].extend(gaps)
    result = {}
    for phase, gaps in phases.items():
        gaps.sort()
        result[phase] = {"steps": len(gaps), "p50_ms": round(1e3 * gaps[len(gaps) // 2], 1),
                         "p99_ms": round(1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 1)}
    engine.shutdown()
    return result


def masks(rows: int = 48) -> dict:
    """A step's grammar work for `rows` sequences inside a JSON string (most tokens allowed) and between
    values (few allowed): filling the bitmasks, and applying them with our kernel and with xgrammar's."""
    import torch
    import xgrammar as xgr

    from pagedllm.kernels.cpu import ops as cpu_ops
    from pagedllm.model.loader import resolve_model
    from pagedllm.structured_output.backend import XgrammarBackend
    from pagedllm.structured_output.params import StructuredOutputsParams
    from pagedllm.tokenizer import load_tokenizer

    source = resolve_model(None)
    vocab = source.config.vocab_size
    backend = XgrammarBackend.from_tokenizer(load_tokenizer(source.path), vocab, source.eos_token_ids)
    grammar = backend.compile(StructuredOutputsParams(json=_items_schema(0)))
    tok = load_tokenizer(source.path)

    def timed(fn, n=50) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return round((time.perf_counter() - t0) / n * 1e3, 3)

    result = {"rows": rows, "vocab": vocab}
    for where, text in (("between values", '{"list0": ['), ("inside a string", '{"list0": [{"word": "ab')):
        states = [backend.matcher(grammar) for _ in range(rows)]
        for st in states:
            for t in tok.encode(text, add_special_tokens=False):
                assert st.accept(t)
        bitmask = xgr.allocate_token_bitmask(rows, vocab)
        fill = timed(lambda: [st.fill_bitmask(bitmask, i) for i, st in enumerate(states)])
        logits = torch.randn(rows, vocab)
        idx = list(range(rows))
        ours = timed(lambda: cpu_ops.apply_token_bitmask(logits, bitmask, idx))
        theirs = timed(lambda: xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, backend="cpu"))
        allowed = int(sum(bin(w & 0xFFFFFFFF).count("1") for w in bitmask[0].tolist()))
        result[where] = {"tokens_allowed": allowed, "fill_ms": fill, "apply_native_ms": ours, "apply_xgrammar_ms": theirs}
    return result


def schemas() -> dict:
    import concurrent.futures

    import openai

    from pagedllm import LLMEngine
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.server.app import build_app
    from pagedllm.entrypoints.server.background import BackgroundServer
    from benchmarks.structured_schemas import SCHEMAS

    engine = LLMEngine(EngineConfig(None))
    results = []
    with BackgroundServer(build_app(engine, ["default"])) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)

        def one(item):
            model, prompt = item
            t0 = time.perf_counter()
            try:
                r = client.beta.chat.completions.parse(model="default", messages=[{"role": "user", "content": prompt}],
                                                       response_format=model, max_tokens=400, temperature=0)
                parsed = r.choices[0].message.parsed
                return {"schema": model.__name__, "parsed": isinstance(parsed, model), "finish_reason": r.choices[0].finish_reason,
                        "seconds": round(time.perf_counter() - t0, 2), "output": r.choices[0].message.content}
            except Exception as exc:  # a cut-off JSON fails to parse: count it, say why
                return {"schema": model.__name__, "parsed": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                        "seconds": round(time.perf_counter() - t0, 2)}

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:
            results = list(pool.map(one, SCHEMAS))
        elapsed = time.perf_counter() - t0
    return {"num_schemas": len(results), "num_parsed": sum(r["parsed"] for r in results), "elapsed_s": round(elapsed, 1),
            "results": results}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_side":
        print(json.dumps(side(sys.argv[2])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["schemas", "throughput", "itl", "masks"])
    parser.add_argument("--repeat", type=int, default=3, help="throughput: rounds (each side once per round); itl: rounds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.what == "throughput":
        figures = throughput(args.repeat)
    elif args.what == "itl":
        figures = itl(args.repeat)
    elif args.what == "masks":
        figures = masks()
    else:
        figures = schemas()
    summary = {k: v for k, v in figures.items() if k not in ("runs", "results")}
    print(json.dumps(summary, indent=1))
    if args.what == "schemas":
        for r in figures["results"]:
            print(f"{r['schema']:20s} parsed={r['parsed']} {r.get('finish_reason', r.get('error', ''))}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
