"""`pagedllm serve` as an operator runs it: the default model in a subprocess, answered by the
openai client, with its flags (--api-key, --served-model-name, engine sizing) and its log lines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pagedllm_serve_answers_a_chat_on_the_default_model(tmp_path, default_model_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", "k", "--served-model-name", "smol", "--max-model-len", "2048", "--kv-cache-memory", "256MiB",
           "--max-num-seqs", "8"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {(tmp_path / 'serve.log').read_text()}"
            assert time.monotonic() < deadline, "the server did not come up in 180s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120) as client:
            assert [m.id for m in client.models.list().data] == ["smol"]
            r = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0
            )
        assert "Paris" in r.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    text = (tmp_path / "serve.log").read_text()
    assert f"as smol on http://127.0.0.1:{port}" in text
    assert "chatcmpl-" in text and "finished (stop)" in text and "prompt +" in text  # the per-request line
    assert proc.returncode == 0, text


def test_a_taken_port_fails_at_once_with_a_clear_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


@pytest.mark.parametrize("flags, words", [
    (["--port", "99999"], "argument --port: a TCP port is an integer in [0, 65535]"),
    (["--shutdown-timeout", "-5"], "argument --shutdown-timeout: seconds must be a finite number >= 0"),
    (["--log-interval", "0"], "argument --log-interval: seconds must be a finite number > 0"),
    (["--served-model-name", "a", ""], "argument --served-model-name: a served model name must not be empty"),
])
def test_server_flags_out_of_range_are_refused_before_anything_loads(flags, words):
    # --port 99999 served, logging a port it was not on; a negative shutdown timeout was taken as given.
    r = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr, r.stderr
