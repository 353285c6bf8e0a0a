"""lm-evaluation-harness's log-likelihood path against `pagedllm serve`, checked against the offline API.

    python -m benchmarks.lm_eval_check --json lm_eval_check.json

Two sides, one after the other (never two models loaded at once):

  server  `pagedllm serve` (the default model unless --model, --dtype float32)
          on a free loopback port, in its own process; once /health answers,
          lm-eval's CLI (from its own virtual environment, --lm-eval) runs the
          local multiple-choice task benchmarks/data/lm_eval_task
          (pagedllm_mc, 40 questions) with --model local-completions: for each
          (question, choice) it sends the token ids of context + continuation
          to /v1/completions with echo, logprobs=1 and max_tokens=1, and sums
          the continuation tokens' token_logprobs (--text-requests: the decoded
          text instead, tokenized again by the server). The server is stopped when
          lm-eval is done. lm-eval tokenizes with the model's own Hugging Face
          directory (tokenizer_backend=huggingface), so nothing comes from the hub.
  direct  LLM(dtype=float32) in this process: the same (context, continuation)
          pairs, tokenized as lm-eval does (trailing spaces of the context move
          to the continuation; the continuation's tokens are those of
          context + continuation past the context's own tokens; no special
          tokens), scored with SamplingParams(prompt_logprobs=1, max_tokens=1):
          the log-likelihood of a choice is the sum of the continuation tokens'
          prompt logprobs, and the prediction is the argmax over the choices,
          as lm-eval's acc takes it.

Reported: both accuracies, how many items both sides predict alike, and the
largest absolute difference between lm-eval's per-choice log-likelihoods (its
--log_samples output) and the direct ones. Exits 0 with a message, doing
nothing, when the lm_eval executable is absent (lm-eval lives in a separate
environment: python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip
install "lm-eval[api]"), and 1 when the accuracies differ or a
log-likelihood is off by more than --tolerance.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = REPO / "benchmarks" / "data" / "lm_eval_task"
TASK_NAME = "pagedllm_mc"
DATA = TASK_DIR / "data.jsonl"
SERVED_NAME = "pagedllm-default"
TARGET_DELIMITER = " "  # the task's target_delimiter (lm-eval's default)


def load_items(path: str | os.PathLike = DATA) -> list[dict]:
    """The task's questions: {"id", "question", "choices", "answer"} each."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model, with its API models' tok_encode (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    whole = enc(context + continuation)
    context_enc = enc(context)
    return context_enc, whole[len(context_enc):]


def requests_for(items: list[dict], tokenizer) -> list[list[tuple[list[int], list[int]]]]:
    """Per item, per choice: (context tokens, continuation tokens), as lm-eval builds its multiple_choice requests."""
    return [[encode_pair(tokenizer, it["question"], TARGET_DELIMITER + c) for c in it["choices"]] for it in items]


def direct_results(llm, items: list[dict]) -> dict:
    """Per-choice log-likelihoods from the offline API's prompt logprobs, each item's prediction, and the accuracy."""
    from pagedllm import SamplingParams

    pairs = requests_for(items, llm.get_tokenizer())
    flat = [ctx + cont for per_item in pairs for ctx, cont in per_item]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in flat],
                        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    lls, k = [], 0
    for per_item in pairs:
        row = []
        for ctx, cont in per_item:
            out, ids = outs[k], flat[k]
            k += 1
            assert list(out.prompt_token_ids) == ids, "the engine changed the prompt's tokens"
            row.append(sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(len(ctx), len(ids))))
        lls.append(row)
    preds = [max(range(len(row)), key=row.__getitem__) for row in lls]
    correct = [int(p == it["answer"]) for p, it in zip(preds, items)]
    return {"acc": sum(correct) / len(items), "loglikelihoods": lls, "predictions": preds, "correct": correct}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagedllm serve exited with {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"pagedllm serve did not answer {url} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_lm_eval(args, tokenizer_path: str, out_dir: str) -> dict:
    """Serve, run lm-eval against it, stop the server; lm-eval's accuracy and per-doc log-likelihoods."""
    port = args.port or _free_port()
    serve = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", args.dtype, "--served-model-name", SERVED_NAME]
    if args.model:
        serve += ["--model", args.model]
    log = open(os.path.join(out_dir, "server.log"), "w")
    server = subprocess.Popen(serve, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(server, f"http://127.0.0.1:{port}/health", args.startup_timeout)
        model_args = ",".join([
            f"model={SERVED_NAME}", f"base_url=http://127.0.0.1:{port}/v1/completions",
            f"num_concurrent={args.num_concurrent}", "max_retries=1", "tokenizer_backend=huggingface",
            f"tokenizer={tokenizer_path}", f"tokenized_requests={not args.text_requests}",
        ])
        cmd = [args.lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK_NAME,
               "--include_path", str(TASK_DIR), "--output_path", os.path.join(out_dir, "lm_eval"), "--log_samples"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_CACHE=os.path.join(out_dir, "hf_datasets"))
        print("+ " + " ".join(cmd), file=sys.stderr)
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-6000:])
            raise RuntimeError(f"lm_eval exited with {done.returncode}")
    finally:
        _stop(server)
        log.close()
    results = sorted(glob.glob(os.path.join(out_dir, "lm_eval", "**", "results_*.json"), recursive=True))
    samples = sorted(glob.glob(os.path.join(out_dir, "lm_eval", "**", f"samples_{TASK_NAME}_*.jsonl"), recursive=True))
    if not results or not samples:
        raise RuntimeError(f"lm_eval wrote no results/samples under {out_dir}/lm_eval")
    with open(results[-1]) as f:
        acc = json.load(f)["results"][TASK_NAME]["acc,none"]
    per_doc = {}
    with open(samples[-1]) as f:
        for line in f:
            s = json.loads(line)
            # filtered_resps: per choice [log-likelihood, is_greedy]
            per_doc[s["doc"]["id"]] = {"loglikelihoods": [float(r[0]) for r in s["filtered_resps"]], "acc": s["acc"]}
    return {"acc": acc, "per_doc": per_doc, "elapsed_s": round(elapsed, 1), "command": cmd}


def compare(items: list[dict], lm: dict, direct: dict) -> dict:
    """Agreement of lm-eval's per-item predictions and log-likelihoods with the direct ones, over the items lm-eval ran."""
    agree, max_diff, checked = 0, 0.0, 0
    disagreements = []
    for i, it in enumerate(items):
        got = lm["per_doc"].get(it["id"])
        if got is None:
            continue
        checked += 1
        ours = direct["loglikelihoods"][i]
        lm_pred = max(range(len(got["loglikelihoods"])), key=got["loglikelihoods"].__getitem__)
        if lm_pred == direct["predictions"][i]:
            agree += 1
        else:
            disagreements.append(it["id"])
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(got["loglikelihoods"], ours)))
    return {"items": checked, "items_agreeing": agree, "disagreeing_ids": disagreements,
            "max_abs_loglikelihood_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-eval", default="/tmp/lmeval-venv/bin/lm_eval", help="the lm_eval executable (its own venv)")
    p.add_argument("--model", default=None, help="model for both sides (default: the embedded default model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--num-concurrent", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--text-requests", action="store_true",
                   help="lm-eval sends text prompts (tokenized_requests=False: its token ids decoded, the server "
                        "tokenizes them again) instead of token ids")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest log-likelihood difference that passes")
    p.add_argument("--keep", default=None, help="keep lm-eval's output and the server log in this directory")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    if not (os.path.isfile(args.lm_eval) and os.access(args.lm_eval, os.X_OK)):
        print(f"skipped: no lm_eval executable at {args.lm_eval} (install lm-eval[api] in its own venv; see --help)")
        return 0

    from benchmarks.report import emit
    from pagedllm.model.loader import resolve_model

    items = load_items()
    if args.limit:
        items = items[: args.limit]
    tokenizer_path = resolve_model(args.model).path
    out_dir = args.keep or tempfile.mkdtemp(prefix="lm_eval_check-")
    os.makedirs(out_dir, exist_ok=True)
    try:
        lm = run_lm_eval(args, tokenizer_path, out_dir)
        from pagedllm import LLM

        llm = LLM(args.model, dtype=args.dtype)
        try:
            started = time.monotonic()
            direct = direct_results(llm, items)
            direct_s = time.monotonic() - started
        finally:
            llm.engine.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    cmp = compare(items, lm, direct)
    ok = lm["acc"] == direct["acc"] and cmp["max_abs_loglikelihood_diff"] <= args.tolerance and not cmp["disagreeing_ids"]
    result = {
        "task": TASK_NAME, "items": len(items), "choices": sum(len(it["choices"]) for it in items),
        "model": args.model or "default", "model_path": tokenizer_path, "dtype": args.dtype,
        "prompts_sent_as": "text" if args.text_requests else "token ids",
        "lm_eval_acc": lm["acc"], "direct_acc": direct["acc"], **cmp,
        "tolerance": args.tolerance, "ok": ok,
        "lm_eval_elapsed_s": lm["elapsed_s"], "direct_elapsed_s": round(direct_s, 1),
        "lm_eval_command": " ".join(lm["command"]),
    }
    emit(result, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
