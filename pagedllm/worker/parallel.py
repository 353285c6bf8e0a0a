"""Tensor parallelism across processes: the ranks' torch.distributed group, rank 0's lead, each rank's cores.

With tensor_parallel_size N there are N processes, one per rank. Rank 0 is
the engine core (scheduler, KV cache manager, and a ModelRunner that samples);
ranks 1..N-1 run worker/tp_worker.py, which only runs forwards. Each holds its
share of every layer (model/tensor_parallel.py) and its own KV pool with its
KV heads, of the same number of blocks, addressed by the same block tables.
Rank 0 sends each step's input (a StepInput: plain lists) and each
copy-on-write to the others before running it itself, so all ranks enter the
same forward with the same tensors and meet in its all-reduces.

The group is built without torch.distributed's global default group (no
init_process_group): a TCPStore at the rendezvous address, and two process
groups on it, held by a TPGroup and handed to the model as a plain all_reduce:
- "compute": the all-reduces inside a forward (gloo on the CPU, NCCL on CUDA),
  with GROUP_TIMEOUT, so a rank that stops answering fails the step;
- "control": rank 0's messages (gloo), which the other ranks wait on for as
  long as the engine idles.
On the CPU, ranks that are all on one host (always so when rank 0 started
them) sum through shared memory instead (worker/shm_all_reduce.py): gloo over
loopback TCP costs more per all-reduce than a small model's layer computes.

The rendezvous address is config.distributed_init_method (tcp://HOST:PORT, or
env:// for MASTER_ADDR and MASTER_PORT, as torchrun sets them); by default a
free port on 127.0.0.1. Rank 0 starts the other ranks on this host
(distributed_workers="spawn"), or they are started apart, on this host or
others, with `python -m pagedllm.worker.tp_worker` (distributed_workers=
"external"; docs/parallel.md). A rank that dies fails the engine with
TensorParallelError naming it: gloo notices a peer's closed connection at
once, rank 0 polls the processes it started, and a rank that hangs is given up
on after GROUP_TIMEOUT.

On the CPU each rank takes its share of this host's cores (torch threads =
cores // ranks on this host) and, with cpu_bind, is bound to its own range of
them: give each rank the cores of one NUMA node by starting the engine with an
affinity that lists the nodes' cores in order (e.g. `taskset -c 0-63`).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from pagedllm.model.tensor_parallel import TPShard
from pagedllm.worker import shm_all_reduce
from pagedllm.worker.shm_all_reduce import ShmAllReduce, ShmAllReduceError

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(seconds=600)  # a collective inside a step: a rank that has not come in this long is lost
STARTUP_TIMEOUT = timedelta(seconds=900)  # ranks meeting, and loading their share of the model
_IDLE_TIMEOUT = timedelta(days=365)  # the other ranks wait for rank 0's next step as long as the engine idles
_INLINE_BYTES = 16384  # a message up to this size goes in one broadcast; longer ones in a second


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (a rank died, failed to start, or stopped answering): the engine stops."""


@dataclass(frozen=True)
class WorkerSetup:
    """What rank 0 sends the other ranks once they have met: what to build, as rank 0 built it."""

    config: object  # the EngineConfig
    max_model_len: int
    kv_groups: list  # worker/kv_cache_groups.py: KVCacheGroup
    device: str  # "cpu" or "cuda"
    dtype: str  # a torch dtype's name


def rendezvous_address(init_method: str | None) -> tuple[str, int] | None:
    """(host, port) of rank 0's store from an init method (tcp://HOST:PORT or env://); None: none given, and
    MASTER_ADDR is not set either."""
    if init_method is None:
        if "MASTER_ADDR" not in os.environ:
            return None
        init_method = "env://"
    url = urlparse(init_method)
    if url.scheme == "env":
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            raise ValueError("distributed_init_method env:// needs MASTER_ADDR and MASTER_PORT in the environment")
        return host, int(port)
    if url.scheme == "tcp" and url.hostname and url.port:
        return url.hostname, url.port
    raise ValueError(f"distributed_init_method must be tcp://HOST:PORT or env://, got {init_method!r}")


def take_cpu_share(local_rank: int, local_size: int, bind: bool) -> list[int]:
    """This rank's share of the cores it may run on: torch's threads, and with bind its affinity; returns the cores.

    Ranks on one host split its cores in order: rank r of n takes the r-th n-th of them. Rank 0 takes its share in
    the engine core's process (the caller's own with core_process=False)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // max(1, local_size))
    torch.set_num_threads(per_rank)
    if bind and len(cores) >= local_size:
        cores = cores[local_rank * per_rank : (local_rank + 1) * per_rank]
        os.sched_setaffinity(0, cores)
    return cores


class TPGroup:
    """One rank's handle on the group: its rank, the two process groups, and on rank 0 the ranks it started."""

    def __init__(self, store, rank: int, size: int, procs: dict | None = None) -> None:
        self.rank, self.size = rank, size
        self.store = store
        self.procs: dict[int, subprocess.Popen] = procs or {}  # rank -> the process rank 0 started for it
        self.closed = False
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, _IDLE_TIMEOUT)
        self.compute = None  # open_compute(), once the ranks know their device (rank 0's setup message)
        self.shm: ShmAllReduce | None = None  # the CPU's all-reduce where every rank is on this host

    def open_compute(self, device_type: str) -> None:
        """The group of the forward's all-reduces: NCCL between GPUs, else gloo, and on the CPU the shared-memory
        all-reduce where every rank is on this host (every rank calls this, in step)."""
        if device_type == "cuda":
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = GROUP_TIMEOUT
            self.compute = ProcessGroupNCCL(dist.PrefixStore("compute", self.store), self.rank, self.size, opts)
        else:
            self.compute = dist.ProcessGroupGloo(dist.PrefixStore("compute", self.store), self.rank, self.size,
                                                 GROUP_TIMEOUT)
            wait = lambda keys: _wait_for(self.store, keys, self.procs, "set up the shared-memory all-reduce")
            self.shm = shm_all_reduce.meet(self.store, self.rank, self.size, GROUP_TIMEOUT.total_seconds(), wait)

    # --- meeting ------------------------------------------------------------
    @classmethod
    def lead(cls, size: int, init_method: str | None, spawn: bool, cpu_bind: bool) -> TPGroup:
        """Rank 0: host the store, start ranks 1..size-1 here if spawn, and wait until every rank has come."""
        address = rendezvous_address(init_method)
        if address is None and not spawn:
            raise ValueError("with distributed_workers='external' the other ranks need an address to meet at: give "
                             "distributed_init_method tcp://HOST:PORT (or set MASTER_ADDR and MASTER_PORT)")
        host, port = address or ("127.0.0.1", 0)
        store = dist.TCPStore(host, port, size, True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
        init = f"tcp://{host}:{store.port}"
        procs = {r: _start_rank(r, size, init, cpu_bind) for r in range(1, size)} if spawn else {}
        if not spawn:
            logger.info("tensor parallel: waiting for ranks 1..%d to join at %s (python -m pagedllm.worker.tp_worker "
                        "--rank R --world-size %d --init-method %s)", size - 1, init, size, init)
        try:
            _wait_for(store, [f"joined/{r}" for r in range(1, size)], procs, "join the group")
            group = cls(store, 0, size, procs)
        except BaseException:
            _stop(procs, 0.0)
            raise
        logger.info("tensor parallel: %d ranks met at %s", size, init)
        return group

    @classmethod
    def join(cls, rank: int, size: int, init_method: str | None) -> TPGroup:
        """Ranks 1..size-1: reach rank 0's store (retrying until it is up) and meet the others."""
        address = rendezvous_address(init_method)
        if address is None:
            raise ValueError("a tensor-parallel rank needs rank 0's address: --init-method tcp://HOST:PORT (or "
                             "MASTER_ADDR and MASTER_PORT in the environment)")
        store = dist.TCPStore(address[0], address[1], size, False, timeout=STARTUP_TIMEOUT)
        store.set(f"joined/{rank}", "1")
        return cls(store, rank, size)

    def shard(self) -> TPShard:
        """What the model gets: this rank's place and the all-reduce of its row-parallel projections."""
        return TPShard(self.rank, self.size, self.shm.all_reduce if self.shm is not None else self.all_reduce)

    # --- in a step ------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks in place and return it."""
        if self.shm is not None:
            return self.shm.all_reduce(x)
        self.compute.allreduce([x]).wait()
        return x

    def send(self, msg: tuple) -> None:
        """Rank 0: one message to every other rank (they take it with recv, in the same order)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        head = torch.zeros(_INLINE_BYTES + 8, dtype=torch.uint8)
        head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        inline = len(data) <= _INLINE_BYTES
        if inline:
            head[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            self.control.broadcast(head, 0).wait()
            if not inline:
                self.control.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0).wait()
        except Exception as exc:
            raise self._broken(exc) from exc

    def recv(self) -> tuple:
        """Ranks 1..size-1: rank 0's next message (waits as long as the engine idles)."""
        head = torch.empty(_INLINE_BYTES + 8, dtype=torch.uint8)
        self.control.broadcast(head, 0).wait()
        n = int(head[:8].view(torch.int64)[0])
        if n <= _INLINE_BYTES:
            return pickle.loads(head[8 : 8 + n].numpy().tobytes())
        data = torch.empty(n, dtype=torch.uint8)
        self.control.broadcast(data, 0).wait()
        return pickle.loads(data.numpy().tobytes())

    def sync(self) -> None:
        """Every rank: meet once, within GROUP_TIMEOUT (after a failed forward: are all ranks still in step?)."""
        opts = dist.AllreduceOptions()
        opts.timeout = GROUP_TIMEOUT
        self.control.allreduce([torch.ones(1)], opts).wait()

    def check_after(self, exc: BaseException) -> None:
        """Rank 0, after its forward raised: TensorParallelError where the group is broken; else return (the input
        made every rank fail alike, and the engine fails that request alone)."""
        if isinstance(exc, ShmAllReduceError):  # a rank is gone or late: it says which, and the ranks are out of step
            raise self._broken(exc) from exc
        try:
            self.send(("sync",))
            self.sync()
        except TensorParallelError as broken:
            raise broken from exc
        except Exception as sync_exc:
            raise self._broken(sync_exc) from exc
        dead = self._dead_ranks()
        if dead:
            raise TensorParallelError(dead) from exc

    def wait_ready(self, key: str, what: str) -> None:
        """Rank 0: wait until every other rank has set `key/R` ('' when all is well, else its error)."""
        _wait_for(self.store, [f"{key}/{r}" for r in range(1, self.size)], self.procs, what)
        for r in range(1, self.size):
            error = self.store.get(f"{key}/{r}").decode()
            if error:
                raise TensorParallelError(f"tensor-parallel rank {r} failed to {what}: {error}")

    def _dead_ranks(self) -> str | None:
        ended = [(r, p) for r, p in self.procs.items() if p.poll() is not None]
        if not ended:
            return None
        return "; ".join(f"tensor-parallel rank {r} (pid {p.pid}) exited ({describe_exit(p.returncode)})" for r, p in ended)

    def _broken(self, exc: BaseException) -> TensorParallelError:
        time.sleep(0.05)  # a rank that just died: let its exit be seen
        dead = self._dead_ranks()
        reason = dead or f"a tensor-parallel rank stopped answering ({type(exc).__name__}: {str(exc).strip()[:300]})"
        return TensorParallelError(f"the tensor-parallel group is broken: {reason}")

    def close(self, timeout: float = 10.0) -> None:
        """Rank 0: tell the other ranks to stop, and wait for those it started (killed if they do not end); every
        rank: unmap the shared-memory segment."""
        if self.closed:
            return
        self.closed = True
        if self.shm is not None:
            self.shm.close()
        if self.rank == 0:
            try:
                broken = bool(self._dead_ranks())
                if not broken:
                    self.send(("shutdown",))
            except TensorParallelError:
                broken = True
            # The ranks of a broken group may wait on one that is gone: they are stopped, not waited for.
            _stop(self.procs, 0.0 if broken else timeout)


def start_tensor_parallel(config, arch, device: torch.device, dtype: torch.dtype, max_model_len: int,
                          kv_groups: list) -> TPGroup:
    """Rank 0, in the engine core: check that the model splits, take this rank's cores, meet the other ranks
    (starting them here unless they are started apart) and send them what to build."""
    from pagedllm.model.models.registry import model_class
    from pagedllm.model.tensor_parallel import check_tensor_parallel

    size = config.tensor_parallel_size
    if not getattr(model_class(arch), "supports_tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size > 1 is not supported for model type {arch.model_type!r} yet "
                         "(supported: the Llama family: llama, mistral, qwen2, qwen3)")
    check_tensor_parallel(arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size, size)
    if device.type == "cuda" and not config.kv_cache_size_given:
        raise ValueError("tensor_parallel_size > 1 on CUDA needs the KV pool's size per rank (kv_cache_memory or "
                         "num_kv_blocks): sizing it from gpu_memory_utilization is not done across ranks yet")
    spawn = config.distributed_workers == "spawn"
    if device.type == "cpu":
        local = (0, size) if spawn else _local_from_env(1)
        cores = take_cpu_share(*local, config.cpu_bind)
        logger.info("tensor parallel rank 0: %d torch threads%s", torch.get_num_threads(),
                    f", bound to cores {cores}" if config.cpu_bind else "")
    else:
        torch.cuda.set_device(_local_from_env(size)[0] if not spawn else 0)
    group = TPGroup.lead(size, config.distributed_init_method, spawn, config.cpu_bind)
    try:
        group.send(("setup", WorkerSetup(config, max_model_len, kv_groups, device.type, str(dtype).replace("torch.", ""))))
        group.open_compute(device.type)
    except BaseException:
        group.close()
        raise
    return group


def _local_from_env(default_size: int) -> tuple[int, int]:
    """(local rank, ranks on this host) as torchrun's environment gives them, else alone on this host."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", default_size))


def _start_rank(rank: int, size: int, init: str, cpu_bind: bool) -> subprocess.Popen:
    """A rank on this host: `python -m pagedllm.worker.tp_worker` (never a fork: the caller's __main__ is not
    imported again, and no thread of this process is copied)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pagedllm.worker.tp_worker", "--rank", str(rank), "--world-size", str(size),
           "--init-method", init, "--local-rank", str(rank), "--local-world-size", str(size),
           "--parent-pid", str(os.getpid())]
    if cpu_bind:
        cmd.append("--cpu-bind")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _wait_for(store, keys: list[str], procs: dict, what: str) -> None:
    """Wait until the store holds every key, failing at once where a rank this process started has exited."""
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    while not store.check(keys):
        for r, p in procs.items():
            if p.poll() is not None:
                raise TensorParallelError(f"tensor-parallel rank {r} exited before it could {what} "
                                          f"({describe_exit(p.returncode)}); its log is above")
        if time.monotonic() > deadline:
            missing = [k for k in keys if not store.check([k])]
            raise TensorParallelError(f"tensor-parallel ranks did not {what} within {STARTUP_TIMEOUT.total_seconds():.0f}s "
                                      f"(missing: {', '.join(missing)})")
        time.sleep(0.02)


def _stop(procs: dict, timeout: float = 10.0) -> None:
    """Wait up to timeout for the processes to end, then kill those that have not."""
    deadline = time.monotonic() + timeout
    for p in procs.values():
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
