"""The all-reduce of tensor-parallel ranks that share one host's CPUs: through a segment of shared memory, not gloo.

gloo sums over TCP, and on loopback each all-reduce still costs several round
trips through the kernel and the ranks' gloo threads; a decode step does two
per layer, so with gloo a small model at TP=2 spent more time meeting than
computing. Ranks on one host instead map one file of /dev/shm. To sum x, each
rank copies x into its own slot, publishes its all-reduce count, waits until
every rank's count has reached it, and sums the slots in rank order into x:
the same operations on the same data on every rank, so every rank ends with
the same bits. A tensor larger than a slot goes in several rounds.

The segment: one 64-byte line per rank holding its count (no two counts share
a cache line), then two sets of slots, one slot per rank in each, used by
round parity. Two sets make one wait per round enough: a rank writes set p in
round k only after every rank has reached round k - 1, that is, after every
rank has finished reading set p in round k - 2.

A rank that dies: each rank holds a lock on its own byte of the segment for as
long as it lives (the kernel drops it when the process ends, however it ends),
so a rank that has waited a while tests the locks of the ranks it waits for
and raises ShmAllReduceError naming the one that is gone, rather than waiting
out the timeout. A rank alive but absent is given up on after the timeout.

The file is unlinked as soon as every rank has mapped it (mappings outlive
the name), so no file is left in /dev/shm whichever rank is killed later.
`meet` decides, on every rank alike, whether the group uses it at all: only
where every rank reports the same host and could map the file; otherwise the
caller keeps its gloo group.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_LINE = 64  # bytes per rank's count: a cache line of its own
_SPINS = 1000  # rounds of reading the counts before the waiting rank starts yielding its core
_YIELD_S = 0.005  # then it yields its core between reads for this long, and sleeps between reads after that
_SLEEP_S = 0.0001
_CHECK_S = 0.25  # a rank that has waited this long tests, every as long again, that the ranks it waits for live


class ShmAllReduceError(RuntimeError):
    """A rank left the shared-memory all-reduce (its process ended) or did not come within the timeout."""


@dataclass(frozen=True)
class ShmLayout:
    """Where things are in the segment."""

    size: int  # ranks
    slot_bytes: int = 4 << 20  # one rank's slot: the most of a tensor that one round sums

    def __post_init__(self) -> None:
        assert self.size >= 1 and self.slot_bytes > 0 and self.slot_bytes % 64 == 0, self

    @property
    def header_bytes(self) -> int:
        """The ranks' counts, rounded up to a page so that the slots start page-aligned."""
        return -(-self.size * _LINE // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + 2 * self.size * self.slot_bytes

    @classmethod
    def of_file(cls, size: int, total_bytes: int) -> ShmLayout:
        """The layout of a segment of this many bytes (what rank 0 made it, read back by the other ranks)."""
        data = total_bytes - cls(size, 64).header_bytes
        return cls(size, data // (2 * size))


class ShmAllReduce:
    """One rank's side of the segment: its slots, its count, and the sum."""

    def __init__(self, path: str, fd: int, rank: int, layout: ShmLayout, timeout: float) -> None:
        """fd: the segment's file, open read-write; this object owns it (its lock lives as long as fd is open)."""
        self.path, self.rank, self.size, self.layout, self.timeout = path, rank, layout.size, layout, timeout
        self._fd = fd
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)  # "this rank lives", until its process ends
        self._mm = mmap.mmap(fd, layout.total_bytes)
        self._counts = memoryview(self._mm)[: layout.header_bytes].cast("q")
        self._mine = rank * _LINE // 8
        self._others = [(r, r * _LINE // 8) for r in range(self.size) if r != rank]
        self._other_idx = [i for _, i in self._others]
        self._data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=layout.header_bytes,
                                      count=layout.total_bytes - layout.header_bytes)
        self._slots: dict[torch.dtype, torch.Tensor] = {}  # dtype -> [2 sets, ranks, slot elements]
        self._round = 0  # rounds this rank has published; the next is _round + 1
        self._broken: str | None = None
        self._fence_lock = threading.Lock()

    @classmethod
    def create(cls, size: int, timeout: float, layout: ShmLayout | None = None) -> ShmAllReduce:
        """Rank 0: a new segment in /dev/shm, its memory taken now (a full /dev/shm fails here, with OSError, rather
        than with SIGBUS in a step)."""
        layout = layout or ShmLayout(size)
        path = os.path.join(SHM_DIR, f"pagedllm-tp-{os.getpid()}-{secrets.token_hex(6)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, layout.total_bytes)
            return cls(path, fd, 0, layout, timeout)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, path: str, rank: int, size: int, timeout: float) -> ShmAllReduce:
        """Ranks 1..size-1: map the segment rank 0 made."""
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(path, fd, rank, ShmLayout.of_file(size, os.fstat(fd).st_size), timeout)
        except BaseException:
            os.close(fd)
            raise

    # --- the sum ------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place, and return it (every rank calls this with a tensor of the same shape and
        dtype, in the same order)."""
        if self._broken is not None:
            raise ShmAllReduceError(self._broken)
        if not x.is_contiguous():
            return x.copy_(self.all_reduce(x.contiguous()))
        flat = x.view(-1)
        slots = self._slots.get(x.dtype)
        if slots is None:
            slots = self._slots[x.dtype] = self._data.view(x.dtype).view(2, self.size, -1)
        total, step = flat.numel(), slots.shape[2]
        for start in range(0, total, step):
            part = flat if total <= step else flat[start : start + step]
            self._round += 1
            ranks = slots[self._round & 1, :, : part.numel()]
            ranks[self.rank].copy_(part)
            self._fence()  # the copy is in memory before the count says so
            self._counts[self._mine] = self._round
            self._wait(self._round)
            self._fence()  # and the others' copies are read only after their counts
            _sum_in_rank_order(ranks, part)
        return x

    def _fence(self) -> None:
        """A full memory barrier: taking a lock is an atomic read-modify-write (a locked instruction on x86), which
        orders every load and store, streaming stores of a large copy included, before those after it."""
        self._fence_lock.acquire()
        self._fence_lock.release()

    def _wait(self, round_: int) -> None:
        """Until every rank has published round_: a short spin (the ranks usually arrive together), then yielding
        the core, then sleeping; testing that late ranks live every _CHECK_S, and raising after the timeout."""
        counts, others = self._counts, self._other_idx
        for _ in range(_SPINS):
            for i in others:
                if counts[i] < round_:
                    break
            else:
                return
        start = time.monotonic()
        check = start + _CHECK_S
        while True:
            late = [r for r, i in self._others if counts[i] < round_]
            if not late:
                return
            now = time.monotonic()
            if now >= check:
                check = now + _CHECK_S
                gone = [r for r in late if not self._alive(r)]
                if gone:
                    self._fail(f"tensor-parallel rank {gone[0]} ended while rank {self.rank} waited for it in an "
                               f"all-reduce (shared memory)")
                if now - start > self.timeout:
                    self._fail(f"tensor-parallel rank {late[0]} did not come to an all-reduce (shared memory) within "
                               f"{self.timeout:g}s")
            if now - start < _YIELD_S:
                os.sched_yield()
            else:
                time.sleep(_SLEEP_S)

    def _alive(self, rank: int) -> bool:
        """Whether rank's process still holds its lock (a lock this process could take is nobody's)."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, rank)
        except OSError:
            return True
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, rank)
        return False

    def _fail(self, reason: str) -> None:
        self._broken = f"the shared-memory all-reduce is broken: {reason}"
        raise ShmAllReduceError(reason)

    # --- the segment ------------------------------------------------------------------
    def unlink(self) -> None:
        """Remove the segment's name (every rank that maps it keeps it until it closes or ends)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._fd < 0:
            return
        self._broken = "the shared-memory all-reduce is closed"
        self._slots.clear()
        self._data = None
        self._counts.release()
        try:
            self._mm.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping ends with the process
            pass
        os.close(self._fd)  # drops this rank's lock
        self._fd = -1


def _sum_in_rank_order(ranks: torch.Tensor, out: torch.Tensor) -> None:
    """out = ranks[0] + ranks[1] + ..., added in that order, in float32 for 16-bit floats and rounded once at the end.

    (Two ranks: one add, which computes 16-bit floats in float32. torch.sum over the ranks' dimension would do the
    same in one call, but reduces across strided rows far more slowly than these adds.)"""
    if len(ranks) == 1:
        return  # out is its own sum
    if len(ranks) == 2:
        torch.add(ranks[0], ranks[1], out=out)
    elif out.dtype in (torch.bfloat16, torch.float16):
        acc = ranks[0].float()
        for r in range(1, len(ranks)):
            acc.add_(ranks[r])
        out.copy_(acc)
    else:
        torch.add(ranks[0], ranks[1], out=out)
        for r in range(2, len(ranks)):
            out.add_(ranks[r])


def host_id() -> str:
    """This host, as ranks compare it: its name and its boot's id (two machines can share a name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def meet(store, rank: int, size: int, timeout: float, wait: Callable[[list[str]], None], *,
         host: str | None = None, layout: ShmLayout | None = None) -> ShmAllReduce | None:
    """Every rank of a group, in step: a ShmAllReduce where every rank is on this host and maps rank 0's segment,
    else None on every rank alike (the caller then sums over gloo).

    store: the group's TCPStore; wait(keys): rank 0 waits until the store holds them (failing when a rank is gone);
    timeout: how long an all-reduce waits for a rank; host: this rank's host (default host_id()); layout: rank 0's
    segment (default ShmLayout(size)); `PAGEDLLM_NO_SHM_ALL_REDUCE=1` on rank 0 keeps gloo."""
    store.set(f"shm/host/{rank}", host if host is not None else host_id())
    if rank != 0:
        return _join(store, rank, size, timeout)
    wait([f"shm/host/{r}" for r in range(1, size)])
    reducer, why = None, ""
    if os.environ.get("PAGEDLLM_NO_SHM_ALL_REDUCE") == "1":
        why = "PAGEDLLM_NO_SHM_ALL_REDUCE=1"
    elif len({store.get(f"shm/host/{r}") for r in range(size)}) > 1:
        why = "the ranks are on more than one host"
    else:
        try:
            reducer = ShmAllReduce.create(size, timeout, layout)
        except OSError as exc:
            why = f"no segment in {SHM_DIR}: {exc}"
    store.set("shm/path", reducer.path if reducer else "")
    if reducer is None:
        logger.info("tensor parallel: all-reduce over gloo (%s)", why)
        return None
    try:
        wait([f"shm/attached/{r}" for r in range(1, size)])
    except BaseException:
        reducer.close()
        raise
    finally:
        reducer.unlink()  # every rank that could map it has: nothing is left behind, whichever rank ends first
    errors = [f"rank {r}: {e}" for r in range(1, size) if (e := store.get(f"shm/attached/{r}").decode())]
    store.set("shm/use", "" if errors else "1")
    if errors:
        logger.info("tensor parallel: all-reduce over gloo (the shared-memory segment: %s)", "; ".join(errors))
        reducer.close()
        return None
    logger.info("tensor parallel: all-reduce through shared memory (%d ranks on this host)", size)
    return reducer


def _join(store, rank: int, size: int, timeout: float) -> ShmAllReduce | None:
    path = store.get("shm/path").decode()
    if not path:
        return None
    try:
        reducer, error = ShmAllReduce.attach(path, rank, size, timeout), ""
    except OSError as exc:  # another /dev/shm (a container of its own), or no room to map it
        reducer, error = None, f"{type(exc).__name__}: {exc}"
    store.set(f"shm/attached/{rank}", error)
    if store.get("shm/use").decode() == "1":
        return reducer
    if reducer is not None:
        reducer.close()
    return None
