"""What a step's message costs between the frontend and the engine core, for each transport we considered.

    python -m benchmarks.transport [--requests 48] [--rounds 2000] [--json FILE]

The engine core sends one message per step: the new token id of every
running sequence (48 in the default workload), their finish reasons, and the
engine's stats. A request goes the other way once (its prompt's token ids).
Two questions decide the transport:

  serialize  encode + decode of one step message (EngineCoreOutputs) and one
             request (a 384-token prompt): pickle of our dataclasses, and,
             when msgspec is installed, msgspec's msgpack of equivalent Structs
  round trip one message to a child process and back, as bytes: a Unix socket
             pair read and written through multiprocessing.connection (what
             core_client.py uses), and, when pyzmq is installed, a zmq PAIR
             socket over ipc://

A side whose package is not installed is skipped (neither is a dependency of
pagedllm: `pip install msgspec pyzmq` beside it to measure them). Figures are
medians over --rounds, in microseconds; the step itself takes tens of
milliseconds on the CPU, which is the scale to read them against.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection


from pagedllm.entrypoints.bench.report import write_json

from pagedllm.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from pagedllm.engine.outputs import EngineStats
from pagedllm.sampling_params import SamplingParams


def step_message(num_requests: int) -> EngineCoreOutputs:
    outs = [EngineCoreOutput(f"cmpl-{i:032x}-0", 0, [1000 + i], num_cached_tokens=16) for i in range(num_requests)]
    stats = EngineStats(1024, 600, 424, num_requests, 0, 0, 0.97, 10, 500, 10000, 100, 20000, 5000, 300)
    return EngineCoreOutputs(outs, stats)


def request_message() -> EngineCoreRequest:
    return EngineCoreRequest("cmpl-" + "0" * 32 + "-0", list(range(1000, 1384)),
                             SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))


def _median_us(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


def serialize(num_requests: int, rounds: int) -> dict:
    step, req = step_message(num_requests), request_message()
    figures = {
        "pickle": {
            "step_bytes": len(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)),
            "step_us": _median_us(lambda: pickle.loads(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)), rounds),
            "request_us": _median_us(lambda: pickle.loads(pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)), rounds),
        }
    }
    try:
        import msgspec
    except ImportError:
        return figures

    # defstruct, not class statements: this module's annotations are strings, which msgspec cannot resolve locally.
    Out = msgspec.defstruct("Out", [("request_id", str), ("index", int), ("new_token_ids", list[int]),
                                    ("new_logprobs", list | None), ("finish_reason", str | None), ("stop_reason", int | None),
                                    ("error", str | None), ("num_cached_tokens", int), ("num_preemptions", int)], array_like=True)
    Stats = msgspec.defstruct("Stats", [("values", list[float])], array_like=True)
    Outs = msgspec.defstruct("Outs", [("outputs", list[Out]), ("stats", Stats), ("timestamp", float)], array_like=True)
    Params = msgspec.defstruct("Params", [("temperature", float), ("max_tokens", int), ("ignore_eos", bool)], array_like=True)
    Req = msgspec.defstruct("Req", [("request_id", str), ("prompt_token_ids", list[int]), ("params", Params),
                                    ("arrival_time", float)], array_like=True)

    m_step = Outs([Out(o.request_id, o.index, o.new_token_ids, None, None, None, None, o.num_cached_tokens, 0)
                   for o in step.outputs], Stats([float(v) for v in vars(step.stats).values()]), step.timestamp)
    m_req = Req(req.request_id, req.prompt_token_ids, Params(0.0, 128, True), req.arrival_time)
    enc = msgspec.msgpack.Encoder()
    dec_step, dec_req = msgspec.msgpack.Decoder(Outs), msgspec.msgpack.Decoder(Req)
    figures["msgspec"] = {
        "step_bytes": len(enc.encode(m_step)),
        "step_us": _median_us(lambda: dec_step.decode(enc.encode(m_step)), rounds),
        "request_us": _median_us(lambda: dec_req.decode(enc.encode(m_req)), rounds),
    }
    return figures


# --- round trips through a child process ------------------------------------------
_ECHO_SOCKET = """
import sys
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
try:
    while True:
        c.send_bytes(c.recv_bytes())
except EOFError:
    pass
"""

_ECHO_ZMQ = """
import sys, zmq
s = zmq.Context().socket(zmq.PAIR)
s.connect(sys.argv[1])
while True:
    m = s.recv()
    if m == b"":
        break
    s.send(m)
"""


def round_trip(payload: bytes, rounds: int) -> dict:
    figures = {}
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", _ECHO_SOCKET, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    conn = Connection(ours.detach())

    def ping_socket():
        conn.send_bytes(payload)
        conn.recv_bytes()

    for _ in range(100):
        ping_socket()
    figures["socketpair"] = _median_us(ping_socket, rounds)
    conn.close()
    child.wait()
    try:
        import zmq
    except ImportError:
        return figures
    path = f"ipc:///tmp/pagedllm-transport-{os.getpid()}"
    sock = zmq.Context().socket(zmq.PAIR)
    sock.bind(path)
    child = subprocess.Popen([sys.executable, "-c", _ECHO_ZMQ, path])

    def ping_zmq():
        sock.send(payload)
        sock.recv()

    for _ in range(100):
        ping_zmq()
    figures["zmq_ipc"] = _median_us(ping_zmq, rounds)
    sock.send(b"")
    child.wait()
    sock.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="sequences in the step message (default 48)")
    parser.add_argument("--rounds", type=int, default=2000, help="timed repetitions per figure (default 2000)")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    payload = pickle.dumps(step_message(args.requests), protocol=pickle.HIGHEST_PROTOCOL)
    figures = {"requests": args.requests, "serialize_us": serialize(args.requests, args.rounds),
               "round_trip_us": round_trip(payload, args.rounds), "payload_bytes": len(payload)}
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
