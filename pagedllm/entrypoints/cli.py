"""`pagedllm serve | generate | bench`: the command line, with engine flags named as vLLM names them."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time

from pagedllm.entrypoints import bench
from pagedllm.entrypoints.args import add_engine_args, engine_options


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


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the engine, then serve; the port opens only once the model is ready to answer."""
    import uvicorn

    from pagedllm.engine.engine import LLMEngine
    from pagedllm.entrypoints.server.app import build_app
    from pagedllm.entrypoints.server.cors import CorsSettings
    from pagedllm.tokenizer import load_chat_template

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"the model is named twice, as {args.model_tag!r} and --model {args.model!r}: give one")
    args.model = args.model_tag or args.model
    template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    # Bound now (listening only once the model is loaded): a taken port fails in a second, not after the load.
    sock = _bind(args.host, args.port)
    t0 = time.perf_counter()
    engine = LLMEngine.from_options(**engine_options(args))
    if template is not None:  # for every request that names none, and for choosing the tool-call parser
        engine.tokenizer.chat_template = template
    from pagedllm.model.loader import default_model_name

    names = args.served_model_name or [args.model or default_model_name()]
    cors = CorsSettings(args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials)
    app = build_app(engine, names, api_key=args.api_key, log_interval=args.log_interval, cors=cors,
                    tool_call_parser=args.tool_call_parser)
    logging.getLogger("pagedllm.serve").info(
        "serving %s as %s on http://%s:%d (engine loaded in %.1fs)%s",
        engine.model_path, ", ".join(names), args.host, sock.getsockname()[1], time.perf_counter() - t0,
        "; API key required" if args.api_key else "",
    )
    # log_config=None: keep our logging set-up instead of uvicorn's.
    # On SIGTERM or Ctrl-C uvicorn stops accepting and lets the requests in flight finish for up to
    # --shutdown-timeout seconds; then the app's shutdown aborts what is left, and the core stops.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    # uvicorn re-raises the signal that stopped it once it is done: Ctrl-C as KeyboardInterrupt, and
    # SIGTERM through the handler that was there before it, which here ends run() the same way.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown()
    logging.getLogger("pagedllm.serve").info("stopped")
    return 0


class _Terminated(Exception):
    """SIGTERM, once uvicorn has shut down gracefully."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; is another server there? pick another --port") from None
    return sock


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="same as --model")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (0: any free one)")
    g.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' (default: $PAGEDLLM_API_KEY; none: no key needed)")
    g.add_argument("--served-model-name", nargs="+", type=_name, default=None,
                   help="names clients use for the model (default: --model, or the embedded model's name)")
    g.add_argument("--log-interval", type=_seconds(positive=True), default=5.0, help="seconds between throughput lines while busy")
    g.add_argument("--access-log", action="store_true", help="also log every HTTP request (uvicorn's access log)")
    g.add_argument("--shutdown-timeout", type=_seconds(positive=False), default=30.0,
                   help="on SIGTERM or Ctrl-C, seconds to let requests in flight finish before they are aborted (default 30)")
    g.add_argument("--allowed-origins", type=_list_flag, default=None,
                   help="web pages (origins) that may call the API from a browser, as a JSON list or a comma list; "
                        "'[\"*\"]' for any (default: local pages only, http://localhost:*, 127.0.0.1 and [::1])")
    g.add_argument("--allowed-methods", type=_list_flag, default=["*"], help="CORS: allowed methods (default: all)")
    g.add_argument("--allowed-headers", type=_list_flag, default=["*"], help="CORS: allowed request headers (default: all)")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: let pages send cookies and credentials")
    g.add_argument("--chat-template", default=None,
                   help="the chat template to use instead of the model's: a .jinja file's path or the template's text")
    g.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                   help="how the model writes tool calls (default: read from its chat template; hermes where it says nothing)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is an integer in [0, 65535] (0: any free one), got {text!r}")
    return port


def _seconds(positive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"seconds must be a finite number {'> 0' if positive else '>= 0'}, got {text!r}")
        return value

    return parse


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a served model name must not be empty")
    return text


def _list_flag(text: str) -> list[str]:
    from pagedllm.entrypoints.server.cors import parse_list

    try:
        return parse_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Serve large language models with PagedAttention.")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_serve_args(serve)
    add_engine_args(serve)
    gen = sub.add_parser("generate", help="generate completions for prompts given on the command line")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--raw", action="store_true", help="complete the prompts as text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate, "serve": cmd_serve, "bench": bench.run}[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
