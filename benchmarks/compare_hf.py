"""Throughput of pagedllm against Hugging Face transformers, on one workload, in one process.

    python -m benchmarks.compare_hf --dtype bfloat16 --json compare_hf.json

Workload (pagedllm.entrypoints.bench.workload.make_workload): 48 requests, random-token prompts of
32..384 tokens, outputs of 32..192 tokens, greedy, every request runs to its
length (EOS ignored), seed 0. All sides load the same weights (the model's
resolved Hugging Face directory; the embedded default unless --model), at the
same --dtype, with the same torch thread settings (one process, untouched).
They run one after the other (--sides picks), each after an untimed warm-up of
2 short requests, and each model is freed before the next one is loaded.

  pagedllm  LLM.generate with one SamplingParams(temperature=0, max_tokens=n,
            ignore_eos=True) per request; engine defaults except --kv-cache-memory
            and --max-num-batched-tokens.
  static    transformers' generate on batches of --batch-size requests in
            order, left padded, greedy, EOS disabled (eos_token_id=-1), and
            max_new_tokens = the batch's longest request: a batch runs until its
            longest output is done, as static batching does. Output tokens count
            only each request's own length (what a user gets); the tokens
            computed past it show in computed_output_tokens.
  cb        transformers' continuous batching: model.init_continuous_batching
            and one add_request per request with its own max_new_tokens and
            eos_token_id=-1 (generate_batch takes one max_new_tokens for all).
            Its defaults on CPU would size the cache at 60% of the machine's RAM
            and take 8,192 tokens a step; we give it what pagedllm has instead:
            KV blocks for --kv-cache-memory and --max-num-batched-tokens tokens a
            step, at most 256 requests a batch (pagedllm's max_num_seqs), its
            default page size (256 tokens) and prefix sharing. Attention is sdpa
            (no flash attention on CPU), which packs a step's requests into one
            sequence under a block-diagonal mask, so it computes scores for
            every (query, key) pair of the step, of any two requests. The
            resolved settings are in the output. On CPU it reads RAM through
            psutil and refuses to run without it.

Reported per side: elapsed, output tokens/s, total (prompt + output) tokens/s,
requests/s; the ratios pagedllm/static and pagedllm/cb of output tokens/s; and,
for information, how many greedy outputs of each HF side equal pagedllm's
(bfloat16 rounding differs between implementations, so a near-tie may go
another way; float32 should agree).

--repeat N runs the sides in turn N times (pagedllm, static, cb, pagedllm, ...)
and reports each side's median run, with every run's elapsed time beside it.
On a shared machine one run of a side can be 20% off its median: transformers'
continuous batching measured anywhere from 33 to 44 output tok/s in one hour
here, so the ratios are only worth quoting over repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

from pagedllm.entrypoints.bench.workload import make_workload, parse_range

SIDES = ("pagedllm", "static", "cb")
MAX_REQUESTS_PER_BATCH = 256  # pagedllm's max_num_seqs default


def _warmup_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(12345)
    return [[rng.randrange(100, vocab - 100) for _ in range(24)] for _ in range(2)]


def _bar(total: int, desc: str, unit: str, use_tqdm: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not use_tqdm)


def _load_hf(path: str, dtype, device: str):
    """SDPA attention where transformers has it for the model; eager where it refuses SDPA (Gemma 2: soft-capping)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def run_pagedllm(path, prompts, out_lens, dtype, device, engine_options, use_tqdm):
    from pagedllm import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, device=device, **engine_options)
    warm = [{"prompt_token_ids": p} for p in _warmup_prompts(llm.engine.model_config.vocab_size)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - t0
    settings = {"block_size": llm.engine.config.block_size, "max_num_seqs": llm.engine.config.max_num_seqs,
                "max_num_batched_tokens": llm.engine.config.max_num_batched_tokens,
                "num_kv_blocks": llm.stats().num_blocks, "preemptions": llm.stats().num_preemptions,
                "prefix_caching": llm.engine.config.enable_prefix_caching}
    return elapsed, [list(o.outputs[0].token_ids) for o in outs], settings


def _static_generate(model, prompts, max_new_tokens, pad_id):
    """One left-padded batch through generate; returns each row's new tokens."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=0, eos_token_id=-1, pad_token_id=pad_id)
    assert out.shape[1] == width + max_new_tokens, "EOS must not end a batch early"
    return out[:, width:].tolist()


def run_static(path, prompts, out_lens, dtype, device, batch_size, use_tqdm):
    import torch
    from transformers.utils import logging as hf_logging

    model = _load_hf(path, dtype, device)
    pad_id = 0  # any id: the attention mask hides it
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    outputs, computed = [], 0
    verbosity = hf_logging.get_verbosity()
    with torch.inference_mode():
        _static_generate(model, _warmup_prompts(model.config.vocab_size), 4, pad_id)
        hf_logging.set_verbosity_error()  # the warm-up said once that eos_token_id=-1 never stops generation
        try:
            t0 = time.perf_counter()
            with _bar(len(batches), "HF static batches", "batch", use_tqdm) as bar:
                for b in batches:
                    longest = max(out_lens[i] for i in b)
                    rows = _static_generate(model, [prompts[i] for i in b], longest, pad_id)
                    outputs += [row[: out_lens[i]] for i, row in zip(b, rows)]
                    computed += longest * len(b)
                    bar.update(1)
            elapsed = time.perf_counter() - t0
        finally:
            hf_logging.set_verbosity(verbosity)
    settings = {"batch_size": batch_size, "padding": "left", "attn_implementation": model.config._attn_implementation,
                "computed_output_tokens": computed}
    del model
    return elapsed, outputs, settings


def _cb_generate(manager, prompts, out_lens, bar=None, prefix="r"):
    """Add every request with its own length, wait for all; returns their new tokens in order."""
    ids = [manager.add_request(p, request_id=f"{prefix}{i}", max_new_tokens=n, eos_token_id=-1)
           for i, (p, n) in enumerate(zip(prompts, out_lens))]
    results = {}
    while len(results) < len(ids):
        r = manager.get_result(timeout=1)
        if r is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped before all requests finished")
            continue
        if r.is_finished():
            if r.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed request {r.request_id}: {r.error}")
            results[r.request_id] = r.generated_tokens
            if bar is not None:
                bar.update(1)
    return [list(results[i]) for i in ids]


def cb_num_blocks(arch, dtype, kv_cache_bytes: int, page_size: int) -> int:
    """As many HF cache blocks (page_size tokens of K and V in every layer) as fit in pagedllm's KV budget."""
    per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * dtype.itemsize
    return max(1, kv_cache_bytes // (per_token * page_size))


def run_cb(path, arch, prompts, out_lens, dtype, device, kv_cache_bytes, max_batch_tokens, use_tqdm):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _load_hf(path, dtype, device)
    page_size = ContinuousBatchingConfig.page_size
    cb_config = ContinuousBatchingConfig(
        num_blocks=cb_num_blocks(arch, dtype, kv_cache_bytes, page_size), max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=MAX_REQUESTS_PER_BATCH)
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(out_lens))
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()  # its generation thread runs each step under torch.no_grad
    try:
        _cb_generate(manager, _warmup_prompts(model.config.vocab_size), [4, 4], prefix="warmup")
        attn = model.config._attn_implementation
        t0 = time.perf_counter()
        with _bar(len(prompts), "HF continuous batching", "req", use_tqdm) as bar:
            outputs = _cb_generate(manager, prompts, out_lens, bar)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
        manager.destroy()
    c = manager.continuous_batching_config
    settings = {"attn_implementation": attn, "page_size": c.page_size, "num_blocks": c.num_blocks,
                "max_batch_tokens": c.max_batch_tokens, "max_requests_per_batch": c.max_requests_per_batch,
                "allow_block_sharing": c.allow_block_sharing, "scheduler_type": c.scheduler_type,
                "use_cuda_graph": list(c.use_cuda_graph), "use_async_batching": c.use_async_batching,
                "compile": c.varlen_compile_config is not None}
    del manager, model
    return elapsed, outputs, settings


def compare(model=None, *, sides=SIDES, num_requests=48, input_len=(32, 384), output_len=(32, 192),
            dtype="bfloat16", device="cpu", batch_size=16, kv_cache_memory="2GiB", max_num_batched_tokens=2048, seed=0,
            repeat=1, use_tqdm=True, max_model_len=None) -> dict:
    """Run the chosen sides on one workload; returns the figures (see the module docstring)."""
    import torch

    from pagedllm.config import parse_memory
    from pagedllm.model.loader import resolve_model

    unknown = set(sides) - set(SIDES)
    if unknown or not sides:
        raise ValueError(f"sides must be some of {', '.join(SIDES)}, got {', '.join(sides)}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if "cb" in sides and device == "cpu":
        from transformers.utils import is_psutil_available

        if not is_psutil_available():  # say so now, not after the other sides have run
            raise RuntimeError("transformers' continuous batching on CPU reads RAM through psutil and sees 0 bytes "
                               "without it: pip install psutil")
    torch_dtype = getattr(torch, dtype)
    source = resolve_model(model)
    prompts, out_lens = make_workload(num_requests, input_len, output_len, source.config.vocab_size, seed)
    prompts = [p["prompt_token_ids"] for p in prompts]
    in_tokens, out_tokens = sum(map(len, prompts)), sum(out_lens)
    kv_bytes = parse_memory(kv_cache_memory)
    runs = {
        "pagedllm": lambda: run_pagedllm(source.path, prompts, out_lens, dtype, device, dict(
            kv_cache_memory=kv_bytes, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len), use_tqdm),
        "static": lambda: run_static(source.path, prompts, out_lens, torch_dtype, device, batch_size, use_tqdm),
        "cb": lambda: run_cb(source.path, source.config, prompts, out_lens, torch_dtype, device, kv_bytes,
                          max_num_batched_tokens, use_tqdm),
    }
    result = {"model": source.path, "dtype": dtype, "device": device, "torch_threads": torch.get_num_threads(),
              "num_requests": num_requests, "input_tokens": in_tokens, "output_tokens": out_tokens,
              "workload": {"input_len": list(input_len), "output_len": list(output_len), "seed": seed},
              "repeat": repeat, "sides": {}}
    order = [s for s in SIDES if s in sides]
    outputs, times, settings_of = {}, {s: [] for s in order}, {}
    for _ in range(repeat):
        for side in order:
            elapsed, outputs[side], settings_of[side] = runs[side]()
            gc.collect()  # the side's model and caches are gone before the next one loads
            if device == "cuda":
                torch.cuda.empty_cache()
            got = [len(o) for o in outputs[side]]
            assert got == out_lens, f"{side}: output lengths {got} differ from the requested {out_lens}"
            times[side].append(elapsed)
    for side in order:
        elapsed, settings = statistics.median(times[side]), settings_of[side]
        figures = {"elapsed_s": round(elapsed, 6), "runs_elapsed_s": [round(t, 3) for t in times[side]],
                   "output_tokens": out_tokens,
                   "output_tokens_per_s": round(out_tokens / elapsed, 2),
                   "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 2),
                   "requests_per_s": round(num_requests / elapsed, 3), "settings": settings}
        if side != "pagedllm" and "pagedllm" in outputs:
            figures["identical_to_pagedllm"] = sum(a == b for a, b in zip(outputs[side], outputs["pagedllm"]))
        result["sides"][side] = figures
    tps = {s: f["output_tokens_per_s"] for s, f in result["sides"].items()}
    result["ratios"] = {f"pagedllm/{s}": round(tps["pagedllm"] / tps[s], 3) for s in ("static", "cb")
                        if "pagedllm" in tps and s in tps}
    return result


def table(result: dict) -> str:
    rows = [("side", "elapsed s", "output tok/s", "total tok/s", "req/s", "= pagedllm")]
    for side, f in result["sides"].items():
        same = f"{f['identical_to_pagedllm']}/{result['num_requests']}" if "identical_to_pagedllm" in f else "-"
        rows.append((side, f"{f['elapsed_s']:.2f}", f"{f['output_tokens_per_s']:.1f}", f"{f['total_tokens_per_s']:.1f}",
                     f"{f['requests_per_s']:.3f}", same))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{result['num_requests']} requests, {result['input_tokens']} prompt + {result['output_tokens']} output "
                 f"tokens (each request's own length; static batches compute more), {result['dtype']} on {result['device']}, "
                 f"{result['torch_threads']} torch threads")
    if result["repeat"] > 1:
        lines.append(f"median of {result['repeat']} runs per side, run in turn; every run's elapsed s: "
                     + "; ".join(f"{side} {', '.join(f'{t:.2f}' for t in f['runs_elapsed_s'])}" for side, f in result["sides"].items()))
    lines += [f"{name} (output tok/s): {r:.2f}x" for name, r in result["ratios"].items()]
    lines += [f"{side} settings: {json.dumps(f['settings'])}" for side, f in result["sides"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as for pagedllm.LLM; default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, run in this order: {','.join(SIDES)}")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--input-len", type=parse_range, default=(32, 384))
    ap.add_argument("--output-len", type=parse_range, default=(32, 192))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every side runs")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per static batch")
    ap.add_argument("--kv-cache-memory", default="2GiB", help="KV cache of pagedllm and of HF continuous batching")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="tokens per step of pagedllm and of HF continuous batching (its max_batch_tokens)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="pagedllm's context (default: the model's; a 128k model needs a KV pool that holds one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="run the sides in turn this many times; report each side's median")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    args = ap.parse_args(argv)
    result = compare(args.model, sides=[s for s in args.sides.split(",") if s], num_requests=args.num_requests,
                     input_len=args.input_len, output_len=args.output_len, dtype=args.dtype, device=args.device,
                     batch_size=args.batch_size,
                     kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
                     seed=args.seed, repeat=args.repeat, max_model_len=args.max_model_len)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
