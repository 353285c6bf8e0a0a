"""benchmarks/skinny_gemm.py on one pass of tiny settings: it times every shape at every row count, and prints what it returns."""

from __future__ import annotations

import re

import pytest

from benchmarks import skinny_gemm as bench
from pagedllm.kernels.cpu import skinny_gemm

pytestmark = pytest.mark.skipif(not skinny_gemm.available(), reason="the skinny kernel needs AVX-512 and a C++ compiler")


@pytest.mark.parametrize("kernel,dtype", [("widen", "bfloat16"), ("widen", "float32"), ("pairs", "bfloat16")])
def test_every_shape_at_every_row_count(kernel, dtype, capsys):
    results = bench.main(["--rows", "1,13", "--reps", "1", "--memory-mb", "1", "--dtype", dtype, "--kernel", kernel])
    assert [(r, s) for r, s, _, _ in results] == [(r, s) for r in (1, 13) for s, _, _ in bench.SHAPES]
    assert all(t_dnn > 0 and t_sk > 0 for _, _, t_dnn, t_sk in results)
    # The printed table is the returned times: one line per row count, each cell "oneDNN ms/skinny ms=speed-up x".
    out = capsys.readouterr().out
    assert "speed-up" in out
    cells = [(int(line.split()[0]), *map(float, cell))
             for line in out.splitlines() if line.split()[:1] in (["1"], ["13"])
             for cell in re.findall(r"([\d.]+)/\s*([\d.]+)=\s*([\d.]+)x", line)]
    assert len(cells) == len(results)
    for (rows, dnn_ms, sk_ms, speedup), (r, _, t_dnn, t_sk) in zip(cells, results):
        assert rows == r
        assert (dnn_ms, sk_ms) == (pytest.approx(1e3 * t_dnn, abs=6e-4), pytest.approx(1e3 * t_sk, abs=6e-4))
        assert speedup == pytest.approx(t_dnn / t_sk, abs=6e-3)


def test_pairs_need_bf16_weights():
    with pytest.raises(SystemExit, match="bfloat16"):
        bench.main(["--kernel", "pairs", "--dtype", "float32"])
