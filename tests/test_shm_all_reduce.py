"""The shared-memory all-reduce (worker/shm_all_reduce.py), over real processes: it sums as gloo does, in bf16 and
float32, tensors larger than a slot and non-contiguous ones, with the same bits on every rank; its file is gone from
/dev/shm once the ranks have met; ranks on different hosts keep gloo; a rank that dies or never comes makes the
others raise, naming it. (That TP=N engines give TP=1's tokens through it: tests/test_tensor_parallel.py.)
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pagedllm.worker.shm_all_reduce import SHM_DIR, ShmAllReduceError, ShmLayout, meet

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"needs {SHM_DIR}")

SHAPES = [(1, 576), (48, 576), (2048, 576), (3, 7)]
DTYPES = [torch.bfloat16, torch.float32]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, size, port, job, args, results, release) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=timedelta(seconds=30))
    try:
        results.put((rank, job(store, rank, size, *args)))
    except BaseException as exc:
        results.put((rank, exc))
    release.wait(30)  # rank 0 holds the store until every rank has answered


def _run(size: int, job, *args, answers: int | None = None) -> dict:
    """job(store, rank, size, *args) in `size` processes; {rank: what it returned or raised} of the first `answers`."""
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, job, args, results, release)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=60) for _ in range(answers or size))
    finally:
        release.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _input(rank: int, case: int, shape, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * case + rank)).to(dtype)


def _meet(store, rank, size, **kw):
    return meet(store, rank, size, 30.0, lambda keys: store.wait(keys), **kw)


def _sum_both_ways(store, rank, size, slot_bytes):
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, timedelta(seconds=30))
    shm = _meet(store, rank, size, layout=ShmLayout(size, slot_bytes))
    assert shm is not None
    left = os.path.exists(shm.path)
    out = []
    for case, (shape, dtype) in enumerate((s, d) for s in SHAPES for d in DTYPES):
        x = _input(rank, case, shape, dtype)
        y = x.clone()
        assert shm.all_reduce(x) is x
        gloo.allreduce([y]).wait()
        out.append((x, y))
    x = _input(rank, len(out), (40, 24), torch.float32).t()  # not contiguous
    shm.all_reduce(x)
    out.append((x, None))
    shm.close()
    return left, out


@pytest.mark.parametrize("size", [2, 3])
def test_sums_as_gloo_does_with_the_same_bits_on_every_rank(size):
    slot_bytes = 64 << 10  # 2048 x 576 goes in 36 rounds in bf16, 72 in float32
    got = _run(size, _sum_both_ways, slot_bytes)
    for r in range(size):
        assert not isinstance(got[r], BaseException), got[r]
        assert got[r][0] is False, "the segment's file outlived the meeting"
    cases = [(s, d) for s in SHAPES for d in DTYPES] + [((40, 24), torch.float32)]
    for case, (shape, dtype) in enumerate(cases):
        xs = [_input(r, case, shape, dtype).float() for r in range(size)]
        in_order = xs[0]
        for x in xs[1:]:
            in_order = in_order + x
        ours = got[0][1][case][0]
        for r in range(1, size):
            assert torch.equal(got[r][1][case][0], ours)  # the same bits everywhere
        want = in_order.to(dtype)
        if case == len(cases) - 1:
            want = want.t()
        assert torch.equal(ours, want)  # in float32, in rank order, rounded once
        theirs = got[0][1][case][1]
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)))
            if size == 2:
                assert torch.equal(ours, theirs)


def _apart(store, rank, size):
    return _meet(store, rank, size, host=f"host-{rank}"), os.getpid()


def test_ranks_on_different_hosts_keep_gloo():
    got = _run(2, _apart)
    assert got[0][0] is None and got[1][0] is None
    assert not glob.glob(os.path.join(SHM_DIR, f"pagedllm-tp-{got[0][1]}-*"))


def _one_dies(store, rank, size):
    shm = _meet(store, rank, size)
    if rank == size - 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        shm.all_reduce(torch.ones(4))
    except ShmAllReduceError as exc:
        return str(exc), time.monotonic() - t0
    return "no error", 0.0


def test_a_rank_that_dies_is_named_by_the_others():
    got = _run(3, _one_dies, answers=2)
    for r in (0, 1):
        message, waited = got[r]
        assert "rank 2 ended" in message
        assert waited < 5


def _one_is_late(store, rank, size):
    shm = meet(store, rank, size, 0.5, lambda keys: store.wait(keys))
    if rank == 1:
        time.sleep(2)  # alive, but never comes
        return None
    errors = []
    for _ in range(2):
        try:
            shm.all_reduce(torch.ones(4))
        except ShmAllReduceError as exc:
            errors.append(str(exc))
    return errors


def test_a_rank_that_never_comes_is_given_up_on_after_the_timeout():
    errors = _run(2, _one_is_late)[0]
    assert "rank 1 did not come" in errors[0]
    assert "broken" in errors[1]  # and the group stays broken
