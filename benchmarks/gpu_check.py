"""The GPU path, checked and measured in one prepared call on a CUDA machine.

    bash benchmarks/gpu_check.sh                                # on the GPU: $OUT/gpu_check.json, the log, junit.xml
    python -m benchmarks.gpu_check --dry-run --out /tmp/gc      # the same steps on the CPU, on tiny shapes (CI)

Each step runs in a process of its own with a time budget, and writes its
figures as it ends, so a step that fails or overruns loses only its own:

  env      torch, triton and transformers versions; the device, its memory.
  tests    tests/test_triton_attention.py and tests/test_cuda_path.py, compiled
           on the GPU (fp32 and bf16 cases, CUDA graphs, memory sizing).
  decode   decode attention alone: the Triton kernel's bytes of KV read per
           second at batch 64 and 256, context 1k and 4k, Qwen3-0.6B's and
           Llama-3-8B's head shapes, bf16 and int8 pools; next to the device's
           copy bandwidth measured in the same step, and torch SDPA on the same
           data laid out contiguously.
  model    a model of Qwen3-0.6B's configuration with random weights, saved
           once (pagedllm/model/synthetic.py): every side loads the same numbers.
  e2e      256 requests, random-token prompts and outputs of 100..1024 tokens,
           ignore_eos, greedy: pagedllm with CUDA graphs, pagedllm eager,
           transformers' continuous batching and its static `generate` (batches
           of 64), each bounded in time; a side that cannot finish reports its
           rate over what it did finish ("partial"). pagedllm's side also
           reports its start-up: the KV pool gpu_memory_utilization gave, and
           the graph capture time.

The summary gives the issue's targets: decode attention's share of the copy
bandwidth at 4k context, pagedllm (graphs) against transformers' continuous
batching, and graphs against eager.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds per step on the GPU; the steps end their own work a little before, the parent kills at budget + 30.
BUDGETS = {"env": 30, "tests": 120, "decode": 45, "model": 45, "pagedllm_graphs": 75, "pagedllm_eager": 60, "hf_cb": 50, "hf_static": 45}
DRY_BUDGETS = {"env": 30, "tests": 120, "decode": 60, "model": 60, "pagedllm_graphs": 60, "pagedllm_eager": 60, "hf_cb": 60, "hf_static": 60}
E2E_SIDES = ("pagedllm_graphs", "pagedllm_eager", "hf_cb", "hf_static")


def workload(spec: dict) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    lo, hi = spec["lengths"]
    vocab = spec["vocab"]
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(spec["num_requests"])]
    return prompts, [rng.randint(lo, hi) for _ in range(spec["num_requests"])]


# --- steps (each in its own process) ------------------------------------------------------
def step_env(spec: dict) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)
    return info


def step_tests(spec: dict) -> dict:
    import xml.etree.ElementTree as ET

    junit = os.path.join(spec["out"], "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_attention.py", "tests/test_cuda_path.py",
           f"--junitxml={junit}"]
    if spec["dry_run"]:
        cmd += ["-k", "selector or capture_sizes or smallest_bucket"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=spec["budget"] - 5)
    result = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "tail": proc.stdout[-3000:]}
    if os.path.exists(junit):
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        failed = []
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:500]})
        result["failed"] = failed[:30]
    return result


def _timer(cuda: bool):
    """A function that times fn() over `iters` runs after `warmup` and returns the median in seconds."""
    import torch

    def median(fn, iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return median


def step_decode(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from pagedllm.kernels.triton import attention as triton_kernels
    from pagedllm.model.attention import kv_quant

    dry = spec["dry_run"]
    dev = "cpu" if dry else "cuda"
    median = _timer(not dry)
    iters = 1 if dry else 10
    copy_bytes = (1 << 20) if dry else (4 << 30)
    x = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    copy_s = median(lambda: y.copy_(x), iters)
    result = {"copy_gb_per_s": round(2 * copy_bytes / copy_s / 1e9, 1), "cases": []}
    x = y = None  # the copy buffers go before the cases allocate
    shapes = {"tiny": (4, 2, 16)} if dry else {"qwen3_0.6b": (16, 8, 128), "llama3_8b": (32, 8, 128)}
    batches, contexts = ((2,), (32,)) if dry else ((64, 256), (1024, 4096))
    deadline = time.monotonic() + spec["budget"] - 10
    bs = 16
    for name, (h, kvh, d) in shapes.items():
        for b in batches:
            for ctx in contexts:
                if time.monotonic() > deadline:
                    result["stopped_early"] = True
                    return result
                g = torch.Generator(device=dev).manual_seed(0)
                nb = b * ctx // bs
                tables = torch.randperm(nb, device=dev, generator=g).view(b, ctx // bs).to(torch.int32)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
                qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
                q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16 if not dry else torch.float32)
                case = {"shape": name, "batch": b, "context": ctx, "heads": h, "kv_heads": kvh, "head_dim": d}
                for kv_name in ("bfloat16", "int8"):
                    if kv_name == "bfloat16":
                        pool = torch.randn(2, nb, bs, kvh, d, device=dev, dtype=q.dtype)
                        kv_bytes = b * ctx * kvh * d * 2 * q.element_size()
                    else:
                        pool = torch.randint(-127, 128, kv_quant.pool_shape(nb, bs, kvh, d, torch.int8), device=dev, dtype=torch.int8)
                        kv_quant.split(pool, kvh, d)[1].fill_(0.02)
                        kv_bytes = b * ctx * kvh * (d + 2) * 2
                    s = median(lambda: triton_kernels.paged_attention(q, pool, tables, lens, qsl, d**-0.5, kvh), iters)
                    case[kv_name] = {"ms": round(s * 1e3, 4), "gb_per_s": round(kv_bytes / s / 1e9, 1),
                                     "of_copy_bandwidth": round(kv_bytes / s / 1e9 / result["copy_gb_per_s"], 3)}
                    pool = None
                k = torch.randn(b, kvh, ctx, d, device=dev, dtype=q.dtype)
                v = torch.randn_like(k)
                q4 = q.view(b, h, 1, d)
                s = median(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), iters)
                kv_bytes = b * ctx * kvh * d * 2 * q.element_size()
                case["sdpa_contiguous"] = {"ms": round(s * 1e3, 4), "gb_per_s": round(kv_bytes / s / 1e9, 1)}
                k = v = None
                result["cases"].append(case)
    return result


def _qwen3_config(dry: bool):
    import transformers

    if dry:
        return transformers.Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                                        tie_word_embeddings=True)
    # Qwen/Qwen3-0.6B's config.json
    return transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                    rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643,
                                    eos_token_id=151645)


def step_model(spec: dict) -> dict:
    from pagedllm.model.synthetic import build_model_dir

    t0 = time.perf_counter()
    cfg = _qwen3_config(spec["dry_run"])
    build_model_dir(spec["model_dir"], cfg, spec["dtype"])
    return {"path": spec["model_dir"], "seconds": round(time.perf_counter() - t0, 1), "vocab_size": cfg.vocab_size,
            "layers": cfg.num_hidden_layers}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def step_pagedllm(spec: dict, graphs: bool) -> dict:
    from pagedllm import LLMEngine, SamplingParams
    from pagedllm.config import EngineConfig

    capture = _Capture()
    logging.getLogger("pagedllm").addHandler(capture)
    logging.getLogger("pagedllm").setLevel(logging.INFO)
    deadline = time.monotonic() + spec["budget"] - 8
    t0 = time.perf_counter()
    # The core in this process: its start-up lines are captured here, and it runs on the thread that built it.
    engine = LLMEngine(EngineConfig(spec["model_dir"], dtype=spec["dtype"], enforce_eager=not graphs, core_process=False,
                                    max_model_len=4096))
    load_s = time.perf_counter() - t0
    prompts, lens = workload(spec)
    engine.add_request("warm", {"prompt_token_ids": prompts[0][:16]}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    before = engine.stats()
    for i, (p, n) in enumerate(zip(prompts, lens)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                           final_only=True)
    t0 = time.perf_counter()
    done = 0
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        done += sum(1 for out in engine.step() if out.finished)
    elapsed = time.perf_counter() - t0
    after = engine.stats()
    tokens = after.generation_tokens_total - before.generation_tokens_total
    startup = [line for line in capture.lines if any(w in line for w in ("KV", "graph", "GiB", "ready", "memory"))]
    return {"elapsed_s": round(elapsed, 2), "output_tokens": tokens, "output_tok_s": round(tokens / elapsed, 1),
            "completed_requests": done, "partial": done < len(prompts), "load_s": round(load_s, 1),
            "num_kv_blocks": after.num_blocks, "kv_cache_tokens": after.kv_cache_tokens, "preemptions": after.num_preemptions,
            "startup_log": startup[-12:]}


def _hf_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cpu" if spec["dry_run"] else "cuda"
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"])).to(dev).eval()


def step_hf_cb(spec: dict) -> dict:
    from transformers import GenerationConfig

    deadline = time.monotonic() + spec["budget"] - 8
    model = _hf_model(spec)
    prompts, lens = workload(spec)
    cb = {}
    if spec["dry_run"]:
        # A cache for the tiny workload, not one sized from the machine's free memory: setting up
        # gigabytes of cache on a busy CPU can outlast the step's budget before any request runs.
        from transformers import ContinuousBatchingConfig

        cb["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256)
    manager = model.init_continuous_batching(generation_config=GenerationConfig(
        do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(lens)), **cb)
    manager.start()
    try:
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        tokens = done = 0
        while done < len(prompts) and time.monotonic() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                done += 1
                tokens += len(r.generated_tokens)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=False)
    return {"elapsed_s": round(elapsed, 2), "output_tokens": tokens, "output_tok_s": round(tokens / elapsed, 1),
            "completed_requests": done, "partial": done < len(prompts),
            "note": "a partial run counts the tokens of finished requests only"}


def step_hf_static(spec: dict) -> dict:
    import torch

    deadline = time.monotonic() + spec["budget"] - 8
    model = _hf_model(spec)
    prompts, lens = workload(spec)
    batch = 8 if spec["dry_run"] else 64
    tokens = done = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            if time.monotonic() > deadline:
                break
            rows = prompts[i : i + batch]
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lens[i : i + batch]),
                           min_new_tokens=0, eos_token_id=-1, pad_token_id=0)
            tokens += sum(lens[i : i + batch])  # each request's own length: what a user gets
            done += len(rows)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": round(elapsed, 2), "output_tokens": tokens, "output_tok_s": round(tokens / elapsed, 1),
            "completed_requests": done, "partial": done < len(prompts), "batch_size": batch}


STEPS = {
    "env": step_env, "tests": step_tests, "decode": step_decode, "model": step_model,
    "pagedllm_graphs": lambda s: step_pagedllm(s, True), "pagedllm_eager": lambda s: step_pagedllm(s, False),
    "hf_cb": step_hf_cb, "hf_static": step_hf_static,
}


# --- the parent ---------------------------------------------------------------------------
def run_step(name: str, spec: dict, log) -> dict:
    result_file = os.path.join(spec["work"], f"{name}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), PYTHONUNBUFFERED="1")
    if spec["dry_run"]:
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on the CPU
    t0 = time.perf_counter()
    print(f"== {name} (budget {spec['budget']}s)", file=log, flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--step", name, "--spec", json.dumps(spec), "--result", result_file],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=spec["budget"] + 30)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = round(time.perf_counter() - t0, 1)
    if os.path.exists(result_file):
        with open(result_file) as f:
            result = json.load(f)
    else:
        result = {"error": f"the step ended ({code}) without a result; see the log"}
    result["step_seconds"] = seconds
    print(f"== {name}: {seconds}s, exit {code}", file=log, flush=True)
    return result


def summarize(results: dict) -> dict:
    s = {}
    decode = results.get("decode", {})
    at_4k = [c["bfloat16"]["of_copy_bandwidth"] for c in decode.get("cases", []) if c.get("context") == 4096 and "bfloat16" in c]
    if at_4k:
        s["decode_share_of_copy_bandwidth_at_4k"] = {"min": min(at_4k), "max": max(at_4k), "target": 0.8}
    rate = {k: results.get(k, {}).get("output_tok_s") for k in E2E_SIDES}
    if rate["pagedllm_graphs"] and rate["hf_cb"]:
        s["graphs_over_hf_continuous_batching"] = {"ratio": round(rate["pagedllm_graphs"] / rate["hf_cb"], 2), "target": 10}
    if rate["pagedllm_graphs"] and rate["hf_static"]:
        s["graphs_over_hf_static"] = round(rate["pagedllm_graphs"] / rate["hf_static"], 2)
    if rate["pagedllm_graphs"] and rate["pagedllm_eager"]:
        s["graphs_over_eager"] = {"ratio": round(rate["pagedllm_graphs"] / rate["pagedllm_eager"], 3), "target": "> 1"}
    tests = results.get("tests", {})
    if "tests" in tests:
        s["tests"] = {k: tests.get(k) for k in ("tests", "failures", "errors", "skipped")}
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where the JSON, the log and junit.xml go ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes: checks the script, measures nothing")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, in order (default: all)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step is not None:  # a child: one step
        spec = json.loads(args.spec)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            result = STEPS[args.step](spec)
        except Exception as exc:
            logging.exception("step %s failed", args.step)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        with open(args.result, "w") as f:
            json.dump(result, f, indent=2)
        return 0

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    base = {"dry_run": args.dry_run, "out": os.path.abspath(args.out), "work": work, "model_dir": os.path.join(work, "model"),
            "dtype": "float32" if args.dry_run else "bfloat16",
            "num_requests": 8 if args.dry_run else 256, "lengths": [4, 12] if args.dry_run else [100, 1024]}
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run}
    json_path = os.path.join(args.out, "gpu_check.json")
    log_path = os.path.join(args.out, "gpu_check_steps.log")
    with open(log_path, "a") as log:
        for name in [s for s in args.steps.split(",") if s]:
            if name not in STEPS:
                parser.error(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
            spec = dict(base, budget=budgets[name])
            if name in E2E_SIDES:
                if not os.path.isdir(base["model_dir"]):
                    results[name] = {"error": "no model: the model step did not run or failed"}
                    continue
                spec["vocab"] = results.get("model", {}).get("vocab_size", 1000)
            results[name] = run_step(name, spec, log)
            results["summary"] = summarize(results)
            with open(json_path, "w") as f:  # after every step: an overrun later loses nothing before it
                json.dump(results, f, indent=2)
            print(f"{name}: {json.dumps(results[name])[:600]}", flush=True)
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
