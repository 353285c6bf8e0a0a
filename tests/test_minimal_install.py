"""The core runs where only torch, triton, transformers, safetensors and tokenizers are installed.

A GPU machine may have no package registry: gguf is needed only for .gguf
files, the web stack only by `pagedllm serve`, so neither may be imported on
the way to generating text from a Hugging Face directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

BLOCKED = ("gguf", "fastapi", "uvicorn", "prometheus_client", "pydantic", "matplotlib", "starlette")

SCRIPT = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[2].split(","))

    class Uninstalled:
        \"\"\"Answers for the blocked packages as if they were not installed.\"\"\"
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled())
    from pagedllm import LLM, SamplingParams
    from pagedllm.entrypoints.cli import main

    llm = LLM(sys.argv[1], load_format="dummy", dtype="float32", num_kv_blocks=64)
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4, out
    assert main(["generate", "--model", sys.argv[1], "--load-format", "dummy", "--kv-cache-memory", "16MiB",
                 "--raw", "--max-tokens", "2", "Hi"]) == 0
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("OK")
""")


def test_generate_without_gguf_or_the_web_stack(tiny_model_dir):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir, ",".join(BLOCKED)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
