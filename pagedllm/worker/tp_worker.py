"""A tensor-parallel rank other than 0: `python -m pagedllm.worker.tp_worker --rank R --world-size N --init-method URL`.

Rank 0 (the engine core) starts these on its own host; with
distributed_workers="external" they are started apart, on this host or on
others (docs/parallel.md), and meet rank 0 at --init-method (tcp://HOST:PORT
of rank 0's host, or env:// with MASTER_ADDR and MASTER_PORT). A rank needs
no engine options of its own: rank 0 sends its EngineConfig, and the model
must be at the same path (or hub id) on every host.

Once built, a rank loops on rank 0's messages (worker/parallel.py):
("forward", StepInput) runs the model on its share of every layer; ("copy",
pairs) copies KV blocks; ("sync",) meets the others after a failed forward;
("shutdown",) ends it. It samples nothing: rank 0 does. A forward that raises
is logged and the loop goes on, because the same input made rank 0 fail at
the same place. It ends with an error when rank 0 is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from functools import partial

logger = logging.getLogger("pagedllm.worker.tp_worker")


def _args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m pagedllm.worker.tp_worker",
                                description="A tensor-parallel rank of a pagedllm engine whose rank 0 runs elsewhere.")
    p.add_argument("--rank", type=int, default=int(env.get("RANK", -1)), help="this rank, 1..N-1 (default: $RANK)")
    p.add_argument("--world-size", type=int, default=int(env.get("WORLD_SIZE", -1)),
                   help="N, the engine's tensor_parallel_size (default: $WORLD_SIZE)")
    p.add_argument("--init-method", default=None,
                   help="where rank 0 waits: tcp://HOST:PORT, or env:// (default: env://, MASTER_ADDR and MASTER_PORT)")
    p.add_argument("--local-rank", type=int, default=int(env.get("LOCAL_RANK", 0)),
                   help="this rank among the ranks on this host: its share of the cores, its GPU (default: $LOCAL_RANK or 0)")
    p.add_argument("--local-world-size", type=int, default=int(env.get("LOCAL_WORLD_SIZE", 1)),
                   help="ranks on this host (default: $LOCAL_WORLD_SIZE or 1)")
    p.add_argument("--cpu-bind", action="store_true", help="bind this rank to its share of the cores (also on when "
                                                           "the engine's cpu_bind is)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # the engine core that started it
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.rank == 0:
        p.error("rank 0 is the engine itself: start it with `pagedllm serve ... --tensor-parallel-size N "
                "--distributed-workers external --distributed-init-method tcp://HOST:PORT`")
    if not 0 < args.rank < args.world_size:
        p.error(f"--rank must be in 1..world_size-1, got rank {args.rank} of world size {args.world_size}")
    if not 0 <= args.local_rank < max(1, args.local_world_size):
        p.error(f"--local-rank must be in 0..local_world_size-1, got {args.local_rank} of {args.local_world_size}")
    return args


def _die_with_parent(parent_pid: int) -> None:
    """A rank started by an engine core ends when that process does, however it ends (Linux: PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it ended before the call
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s rank {args.rank} %(name)s: %(message)s")
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core decides when its ranks stop
    from pagedllm.worker.parallel import TPGroup

    group = TPGroup.join(args.rank, args.world_size, args.init_method)
    try:
        runner = _build(group, args)
    except Exception as exc:
        logger.exception("this rank failed to start")
        group.store.set(f"ready/{args.rank}", f"{type(exc).__name__}: {exc}")
        return 1
    group.store.set(f"ready/{args.rank}", "")
    try:
        return _loop(group, runner, args.rank)
    except Exception as exc:  # rank 0 is gone, the group broke, or this rank's KV pool did not fit
        logger.error("this rank stops: %s: %s", type(exc).__name__, exc)
        return 1


def _build(group, args):
    """Take rank 0's setup, the cores or GPU of this rank, and build its share of the model."""
    import torch

    from pagedllm.model.attention.selector import get_attention_backend
    from pagedllm.model.loader import iter_weights, resolve_model
    from pagedllm.worker.model_runner import ModelRunner
    from pagedllm.worker.parallel import take_cpu_share

    kind, setup = group.recv()
    assert kind == "setup", kind
    group.open_compute(setup.device)
    config = setup.config
    if setup.device == "cpu":
        cores = take_cpu_share(args.local_rank, args.local_world_size, args.cpu_bind or config.cpu_bind)
        logger.info("%d torch threads%s", torch.get_num_threads(),
                    f", bound to cores {cores}" if args.cpu_bind or config.cpu_bind else "")
    else:
        torch.cuda.set_device(args.local_rank)
    device = torch.device(setup.device)
    source = resolve_model(config.model, config.revision)
    weights = None if config.load_format == "dummy" else partial(iter_weights, source)
    return ModelRunner(source.config, weights, device=device, dtype=getattr(torch, setup.dtype),
                       block_size=config.block_size, seed=config.seed,
                       attn_backend=get_attention_backend(device.type, config.attention_backend),
                       kv_cache_dtype=config.kv_cache_dtype, kv_groups=setup.kv_groups, tp=group)


def _loop(group, runner, rank: int) -> int:
    while True:
        msg = group.recv()
        kind = msg[0]
        if kind == "forward":
            try:
                runner.forward(msg[1])
            except Exception as exc:  # rank 0 failed alike: it finds the request behind it and ends that one
                logger.warning("a forward failed (%s: %s); rank 0 ends the request behind it", type(exc).__name__, exc)
        elif kind == "copy":
            runner.copy_blocks(msg[1])
        elif kind == "allocate":
            try:
                runner.allocate_kv_cache(msg[1])
            except Exception as exc:
                group.store.set(f"allocated/{rank}", f"{type(exc).__name__}: {exc}")
                raise
            group.store.set(f"allocated/{rank}", "")
        elif kind == "sync":
            group.sync()
        elif kind == "shutdown":
            return 0
        else:
            raise ValueError(f"unknown message {kind!r} from rank 0")


def _exit(code: int) -> None:
    """End without the interpreter's teardown: destroying the process groups while a peer closes its side can hit
    a gloo thread still joinable, and std::terminate turns a clean stop into SIGABRT. Nothing is left to flush but
    the logs and the standard streams."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
