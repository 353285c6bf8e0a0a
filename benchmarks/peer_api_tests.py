"""Run vLLM's and llama.cpp's own OpenAI-API tests against `pagedllm serve`.

    python -m benchmarks.peer_api_tests --vllm /path/to/vllm [--llama-cpp /path/to/llama.cpp] [--json out.json]

The peer checkouts are the user's (a git clone, or the search tool's fetch):
nothing of theirs is kept in this repository. At run time the runner copies
the selected test files into a temp dir next to a shim it writes there:

* vLLM: `tests/utils.py` with a `RemoteOpenAIServer` that starts `pagedllm
  serve` (free port, the test's model name as --served-model-name, vLLM-only
  flags dropped), a `tests/conftest.py` with the sample fixtures the tests ask
  for (our own schema, regex and choices), and a `vllm` stand-in package whose
  get_tokenizer/ModelConfig answer for the model pagedllm serves.
* llama.cpp: their own `utils.py` starts the binary named by
  LLAMA_SERVER_BIN_PATH; the runner points it at a small script that accepts
  llama-server's flags and execs `pagedllm serve` with the translated ones.

The peer tests need pytest-asyncio and jsonschema (vLLM) and wget (llama.cpp's
utils.py imports it): put them on PYTHONPATH or install them in the venv.
Prints one line per test and a count per suite; --json writes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

# --- what runs -----------------------------------------------------------------
# (path in the peer checkout, or the paths it has had across versions; -k expression or None; why). Chosen for the
# features pagedllm gained: structured outputs, tool calls, prompt logprobs,
# return_token_ids, beam search, usage details, logit_bias.
VLLM_SELECTION = [
    # all HTTP: logprobs, echo+logprobs, prompt_logprobs, stream_options/continuous
    # usage, cached_tokens, beam search, invalid json/regex/grammar -> 400
    # Left out: test_completion_request_* (unit tests of vLLM's request-to-SamplingParams conversion).
    ("tests/entrypoints/openai/completion/test_completion.py", "not test_completion_request_", "completions"),
    # structured outputs, response_format, logprobs, prompt_logprobs, usage.
    # Left out: the zephyr-lora parameters (LoRA), the to_sampling_params unit
    # tests and test_null_top_logprobs_is_same_as_omitted (vLLM internals), n/seed/custom-role tests (not these features),
    # /invocations (SageMaker route).
    ("tests/entrypoints/openai/chat_completion/test_chat.py",
     "(logprobs or stream_options or structured_outputs or response_format or chat_streaming"
     " or single_chat_session) and not zephyr-lora and not null_top_logprobs_is_same_as_omitted", "chat"),
    # tools: auto/required/named, streamed tool_calls, tool_choice/tools mismatch -> 400.
    # Left out: enable_thinking=True (Qwen3's reasoning parser; pagedllm has none).
    ("tests/entrypoints/openai/chat_completion/test_completion_with_function_calling.py",
     "not (test_function_tool_use and True-)", "tools"),
    # return_token_ids / prompt_token_ids, with tools and streaming (basic/conftest.py serves)
    (("tests/entrypoints/openai/basic/test_return_token_ids.py",
      "tests/entrypoints/openai/test_return_token_ids.py"), None, "return_token_ids"),
    # chat echo + continue_final_message, prompt_logprobs=-1, top_logprobs=-1
    (("tests/entrypoints/openai/basic/test_chat_echo.py",
      "tests/entrypoints/openai/chat_completion/test_chat_echo.py"), None, "chat echo"),
    # logit_bias range check (needs vllm.config.ModelConfig: the stand-in answers)
    (("tests/entrypoints/openai/basic/test_chat_logit_bias_validation.py",
      "tests/entrypoints/openai/chat_completion/test_chat_logit_bias_validation.py"), None, "logit_bias"),
    # Not run: tests/tool_use and tests/entrypoints/openai/tool_parsers (one model
    # family each: Qwen, Llama 3, Mistral, xLAM, ...), multimodal, LoRA, prompt
    # embeds (test_prompt_validation), harmony/reasoning, vLLM unit tests.
]
# Support files copied beside the selection when present.
VLLM_SUPPORT = ["tests/entrypoints/openai/basic/conftest.py"]

LLAMA_SELECTION = [
    # /v1/chat/completions: response_format json_object/json_schema, logprobs,
    # usage, streaming. Left out: their native /completion and /infill, slots,
    # ctx shift, multimodal, LoRA, speculative, reranking/embeddings.
    ("tools/server/tests/unit/test_chat_completion.py",
     "response_format or json_schema or grammar or logprobs or usage or stream or tool", "chat"),
    # fast tool-call tests (tinyllama template); --slow tests need 7B+ models.
    ("tools/server/tests/unit/test_tool_call.py", "not slow", "tools"),
    # tool_choice "required" under real models' chat templates (Hermes 2 Pro and 3, functionary, Llama 3.2,
    # and chatml): the default model stands in for theirs (no downloads), the call is forced by a grammar.
    ("tools/server/tests/unit/test_tool_call.py", "required_tool_real_model and (Hermes or functionary or Llama-3.2)",
     "tools required"),
    ("tools/server/tests/unit/test_tokenize.py", None, "tokenize"),
]
LLAMA_SUPPORT = ["tools/server/tests/utils.py", "tools/server/tests/conftest.py"]
LLAMA_TEMPLATES = "models/templates"  # the chat templates the tool-call tests load by relative path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# --- the vLLM shim -------------------------------------------------------------
VLLM_UTILS = r'''
"""Stand-in for vLLM's tests/utils.py: RemoteOpenAIServer starts `pagedllm serve`."""
import json, os, shlex, socket, subprocess, sys, time
import openai, requests

ROCM_ENV_OVERRIDES = {}
ROCM_EXTRA_ARGS = []

# flags pagedllm serve takes as they are: name -> takes a value
KEEP = {"--max-model-len": True, "--max-num-seqs": True, "--enforce-eager": False,
        "--enable-prefix-caching": False, "--no-enable-prefix-caching": False,
        "--seed": True, "--api-key": True, "--max-num-batched-tokens": True, "--max-logprobs": True}
PARSERS = {"hermes", "llama3_json", "mistral"}
CURRENT = {}


def translate(model, args):
    out, dropped, i = [], [], 0
    args = [str(a) for a in args]
    while i < len(args):
        a = args[i]
        name, eq, val = a.partition("=")
        has_val = bool(eq) or (i + 1 < len(args) and not args[i + 1].startswith("--"))
        if not eq and has_val:
            val = args[i + 1]
        step = 1 if eq or not has_val else 2
        if name in KEEP:
            if KEEP[name]:
                out += [name, val]
            else:
                out.append(name); step = 1
        elif name == "--tool-call-parser" and val in PARSERS:
            out += [name, val]
        else:
            dropped.append(" ".join(args[i:i + step]))
        i += step
    out += ["--dtype", os.environ.get("PEER_DTYPE", "float32")]
    out += ["--served-model-name", model, os.environ.get("PEER_DEFAULT_NAME", "SmolLM2-135M-Instruct")]
    cap = os.environ.get("PEER_MAX_MODEL_LEN")
    if cap:  # a request without max_tokens generates to the end of the context: keep that short on a CPU
        if "--max-model-len" in out:
            j = out.index("--max-model-len")
            out[j + 1] = str(min(int(out[j + 1]), int(cap)))
        else:
            out += ["--max-model-len", cap]
    return out, dropped


class RemoteOpenAIServer:
    DUMMY_API_KEY = "token-abc123"

    def __init__(self, model, vllm_serve_args, *, env_dict=None, seed=0, auto_port=True,
                 max_wait_seconds=None, **_ignored):
        self.model = model
        args, dropped = translate(model, vllm_serve_args)
        if "--seed" not in args and seed is not None:
            args += ["--seed", str(seed)]
        s = socket.socket(); s.bind(("127.0.0.1", 0)); self.port = s.getsockname()[1]; s.close()
        self.host = "127.0.0.1"
        cmd = shlex.split(os.environ["PEER_PAGEDLLM_CMD"]) + ["--host", self.host, "--port", str(self.port)] + args
        print("shim: starting", " ".join(cmd), "| dropped:", dropped, flush=True)
        env = dict(os.environ, **(env_dict or {}))
        self.proc = subprocess.Popen(cmd, env=env, stdout=sys.stdout, stderr=sys.stderr)
        deadline = time.time() + (max_wait_seconds or 240)
        while True:
            try:
                if requests.get(self.url_for("health"), timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagedllm serve exited with {self.proc.returncode}")
            if time.time() > deadline:
                self.proc.terminate(); raise RuntimeError("pagedllm serve did not start")
            time.sleep(0.3)
        CURRENT["url"] = self.url_root
        CURRENT["root"] = requests.get(self.url_for("v1", "models"), timeout=10).json()["data"][0].get("root")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill(); self.proc.wait()

    @property
    def url_root(self):
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts):
        return self.url_root + "/" + "/".join(str(p).strip("/") for p in parts)

    def get_client(self, **kw):
        kw.setdefault("timeout", 600)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kw)

    def get_async_client(self, **kw):
        kw.setdefault("timeout", 600)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kw)
'''

VLLM_CONFTEST = r'''
"""Fixtures vLLM's root conftest gives these tests, written afresh for the shim."""
import os, tempfile
import pytest

try:  # test_chat.py downloads a LoRA for its server fixture; the shim drops LoRA flags
    import huggingface_hub
    huggingface_hub.snapshot_download = lambda *a, **k: tempfile.mkdtemp(prefix="nolora-")
except ImportError:
    pass


@pytest.fixture
def sample_json_schema():
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 18, "maximum": 70},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "team": {"type": "string", "enum": ["core", "infra", "research"]},
        },
        "required": ["name", "age", "skills", "team"],
        "additionalProperties": False,
    }


@pytest.fixture
def sample_regex():
    return r"(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}"


@pytest.fixture
def sample_structured_outputs_choices():
    return ["Rust", "Haskell", "OCaml", "Ada", "Swift", "Scala"]
'''

VLLM_STUB = r'''
"""A stand-in `vllm` package: the few names the selected tests import."""
import importlib.abc, importlib.machinery, sys, types


def get_tokenizer(tokenizer_name=None, *args, **kwargs):
    from pagedllm.tokenizer import load_tokenizer
    from tests.utils import CURRENT
    return load_tokenizer(CURRENT["root"])


class ModelConfig:
    def __init__(self, *args, **kwargs):
        pass

    def get_vocab_size(self):
        import requests
        from tests.utils import CURRENT
        return int(requests.get(CURRENT["url"] + "/v1/models", timeout=10).json()["data"][0].get("vocab_size")
                   or len(get_tokenizer()))


class _HubStandIn:
    """Fixtures that download adapters (zephyr LoRA) get an empty directory: the shim drops LoRA flags, and the
    tests that ask for an adapter are not selected."""
    def snapshot_download(self, *args, **kwargs):
        import tempfile
        return tempfile.mkdtemp(prefix="no-lora-")


def hf_api(*args, **kwargs):
    return _HubStandIn()


class _Unavailable:
    """vLLM internals the runner does not select; using one fails that test."""
    def __init__(self, *a, **k):
        raise RuntimeError("vLLM internal: not available under the pagedllm shim")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "vllm" or name.startswith("vllm."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.get_tokenizer = get_tokenizer
        m.ModelConfig = ModelConfig
        m.hf_api = hf_api
        m.__getattr__ = lambda attr: _Unavailable
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''

# --- the llama.cpp shim --------------------------------------------------------
LLAMA_SERVER_SHIM = r'''#!/usr/bin/env python3
"""Accepts llama-server's flags and execs `pagedllm serve` with translated ones."""
import os, shlex, sys

args = sys.argv[1:]
out, names, i = [], [], 0
VALUED = {"--port", "--host", "--temp", "--seed", "--hf-repo", "--hf-file", "--model", "-m", "--alias", "--ctx-size", "-c",
          "--parallel", "-np", "--n-predict", "--batch-size", "--ubatch-size", "--threads", "--n-gpu-layers", "-ngl",
          "--chat-template", "--chat-template-file", "--reasoning-format", "--reasoning", "--api-key", "-fa", "-ctk",
          "-ctv", "--pooling", "--tags", "--model-url", "--lora", "--slot-save-path", "--grp-attn-n", "--grp-attn-w",
          "--spec-type", "--cache-ram", "--sleep-idle-seconds", "--media-path", "--mmproj-url", "--models-dir",
          "--models-max", "--models-preset", "--cors-origins", "--model-draft", "--spec-draft-n-max",
          "--spec-draft-n-min", "--tools", "--tools-runtime", "--mcp-servers-config", "--mcp-servers-json"}
while i < len(args):
    a = args[i]
    v = args[i + 1] if a in VALUED and i + 1 < len(args) else None
    if a == "--port": out += ["--port", v]
    elif a == "--host": out += ["--host", v]
    elif a == "--seed": out += ["--seed", v]
    elif a in ("--ctx-size", "-c") and int(v) > 0: out += ["--max-model-len", v]
    elif a in ("--parallel", "-np"): out += ["--max-num-seqs", v]
    elif a == "--alias": names.append(v)
    elif a == "--api-key": out += ["--api-key", v]
    elif a == "--chat-template-file": out += ["--chat-template", v]
    elif a == "--chat-template" and "{" in v: out += ["--chat-template", v]  # Jinja text; not a built-in name
    i += 2 if v is not None else 1
names.append(os.environ.get("PEER_DEFAULT_NAME", "SmolLM2-135M-Instruct"))
cmd = shlex.split(os.environ["PEER_PAGEDLLM_CMD"]) + out + ["--dtype", os.environ.get("PEER_DTYPE", "float32"),
                                                          "--served-model-name", *names]
print("shim: llama-server", " ".join(args), "->", " ".join(cmd), flush=True)
os.execvp(cmd[0], cmd)
'''


def _copy(src_root: Path, rel: str, dst_root: Path) -> bool:
    src = src_root / rel
    if not src.exists():
        return False
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return True


def _packages(root: Path, top: Path) -> None:
    """__init__.py in every folder from top down, so relative imports resolve as in the peer's tree."""
    for d in [top, *[p for p in top.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch(exist_ok=True)


def _pytest(workdir: Path, targets: list[tuple[str, str | None]], env: dict, junit: Path, timeout: int,
            extra: list[str], and_k: str | None = None) -> int:
    rc = 0
    for i, (rel, k) in enumerate(targets):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "--rootdir", str(workdir),
               f"--junitxml={junit}.{i}.xml", "-o", "asyncio_default_fixture_loop_scope=function",
               "-o", "junit_family=xunit1", str(workdir / rel), *extra]
        if k and and_k:
            cmd += ["-k", f"({k}) and ({and_k})"]
        elif k or and_k:
            cmd += ["-k", k or and_k]
        print("+", " ".join(cmd), flush=True)
        try:
            r = subprocess.run(cmd, cwd=workdir, env=env, timeout=timeout)
            rc = rc or r.returncode
        except subprocess.TimeoutExpired:
            print(f"!! {rel} timed out after {timeout}s", flush=True)
            rc = rc or 124
    return rc


def _results(junit: Path, suite: str) -> list[dict]:
    out = []
    for f in sorted(junit.parent.glob(junit.name + ".*.xml")):
        for case in ET.parse(f).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    msg = (el.get("message") or "")[:400]
            out.append({"suite": suite, "test": f"{case.get('file') or case.get('classname')}::{case.get('name')}",
                        "outcome": outcome, "message": msg})
    return out


def run_vllm(peer: Path, tmp: Path, env: dict, timeout: int, extra: list[str]) -> list[dict]:
    work = tmp / "vllm"
    (work / "tests").mkdir(parents=True)
    targets = []
    for paths, k, _why in VLLM_SELECTION:
        paths = (paths,) if isinstance(paths, str) else paths
        if os.environ.get("PEER_ONLY") and not any(os.environ["PEER_ONLY"] in p for p in paths):
            continue
        rel = next((p for p in paths if _copy(peer, p, work)), None)
        if rel is not None:
            targets.append((rel, k))
        else:
            print(f"-- not in the checkout: {' or '.join(paths)}")
    for rel in VLLM_SUPPORT:
        _copy(peer, rel, work)
    _packages(work, work / "tests")
    (work / "tests" / "utils.py").write_text(VLLM_UTILS)
    (work / "tests" / "conftest.py").write_text(VLLM_CONFTEST)
    (work / "vllm_stub.py").write_text(VLLM_STUB)
    (work / "conftest.py").write_text("import vllm_stub  # noqa: F401  (installs the stand-in vllm package)\n")
    env = dict(env, PYTHONPATH=os.pathsep.join([str(work), env.get("PYTHONPATH", "")]))
    junit = tmp / "junit-vllm"
    _pytest(work, targets, env, junit, timeout, extra, os.environ.get("PEER_K"))
    return _results(junit, "vllm")


def run_llama(peer: Path, tmp: Path, env: dict, timeout: int, extra: list[str]) -> list[dict]:
    work = tmp / "llama.cpp"
    targets = []
    for rel, k, _why in LLAMA_SELECTION:
        if _copy(peer, rel, work):
            targets.append((rel, k))
        else:
            print(f"-- not in the checkout: {rel}")
    for rel in LLAMA_SUPPORT:
        _copy(peer, rel, work)
    if (peer / LLAMA_TEMPLATES).is_dir():
        shutil.copytree(peer / LLAMA_TEMPLATES, work / LLAMA_TEMPLATES)
    shim = tmp / "llama-server"
    shim.write_text(LLAMA_SERVER_SHIM.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    shim.chmod(0o755)
    tests_dir = work / "tools/server/tests"
    env = dict(env, LLAMA_SERVER_BIN_PATH=str(shim),
               PYTHONPATH=os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")]))
    junit = tmp / "junit-llama"
    _pytest(tests_dir, [(str(Path(r).relative_to("tools/server/tests")), k) for r, k in targets], env, junit,
            timeout, extra, os.environ.get("PEER_K"))
    return _results(junit, "llama.cpp")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", type=Path, help="a vLLM checkout")
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp checkout")
    ap.add_argument("--json", type=Path, help="write the per-test results here")
    ap.add_argument("--pagedllm", default=f"{sys.executable} -m pagedllm.entrypoints.cli serve",
                    help="command that starts the server (default: %(default)s)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="cap the context of the servers the vLLM tests start, so that tests sending no max_tokens end "
                         "in reasonable time on a CPU")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per test file")
    ap.add_argument("-k", dest="k", help="narrow the selection further (ANDed with each file's -k)")
    ap.add_argument("--only", help="vLLM: run only the selected files whose path contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    a = ap.parse_args(argv)
    if not (a.vllm or a.llama_cpp):
        ap.error("give --vllm and/or --llama-cpp")
    if a.k:
        os.environ["PEER_K"] = a.k
    if a.only:
        os.environ["PEER_ONLY"] = a.only
    env = dict(os.environ, PEER_PAGEDLLM_CMD=a.pagedllm, PEER_DTYPE=a.dtype, PEER_DEFAULT_NAME=DEFAULT_MODEL_NAME,
               PEER_MAX_MODEL_LEN=str(a.max_model_len or ""))
    tmp = Path(tempfile.mkdtemp(prefix="peer-api-"))
    results = []
    try:
        if a.vllm:
            results += run_vllm(a.vllm.resolve(), tmp, env, a.timeout, a.pytest_args)
        if a.llama_cpp:
            results += run_llama(a.llama_cpp.resolve(), tmp, env, a.timeout, a.pytest_args)
    finally:
        if a.keep:
            print("temp dir kept:", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    for r in results:
        print(f"{r['outcome'].upper():8} {r['suite']:9} {r['test']}" + (f"  -- {r['message'][:160]}" if r["message"] else ""))
    counts = {}
    for r in results:
        c = counts.setdefault(r["suite"], {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        c[r["outcome"]] += 1
    for suite, c in counts.items():
        print(f"{suite}: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
    if a.json:
        a.json.write_text(json.dumps({"counts": counts, "results": results}, indent=1))
    return 0 if results and all(c["failed"] == 0 and c["error"] == 0 for c in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
