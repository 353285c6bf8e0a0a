"""`pagedllm generate`: the command line, with engine flags named as vLLM names them."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--revision", default=None)
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", default=None, help="KV pool size: bytes, or e.g. 2GiB (default 2GiB)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--seed", type=int, default=0)


def engine_options(args: argparse.Namespace) -> dict:
    kv = args.kv_cache_memory
    if kv is not None and kv.isdigit():
        kv = int(kv)
    return dict(
        model=args.model, tokenizer=args.tokenizer, revision=args.revision, load_format=args.load_format,
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, block_size=args.block_size,
        kv_cache_memory=kv, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    opts = engine_options(args)
    t0 = time.perf_counter()
    llm = LLM(opts.pop("model"), **opts)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sampling_seed)
    t0 = time.perf_counter()
    if args.raw:
        outs = llm.generate(args.prompts, params, use_tqdm=False)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    for prompt, out in zip(args.prompts, outs):
        print(f">>> {prompt}\n{out.outputs[0].text}\n[{len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason}]\n")
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"model loaded in {load_s:.2f}s; {tokens} tokens in {gen_s:.2f}s ({tokens / gen_s:.1f} tokens/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Serve large language models with PagedAttention.")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts given on the command line")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="complete the prompts as text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate}[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
