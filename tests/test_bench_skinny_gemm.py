"""benchmarks/skinny_gemm.py on one pass of tiny settings: it runs, and times every shape at every row count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pagedllm.kernels.cpu import skinny_gemm

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import skinny_gemm as bench  # noqa: E402

pytestmark = pytest.mark.skipif(not skinny_gemm.available(), reason="the skinny kernel needs AVX-512 and a C++ compiler")


@pytest.mark.parametrize("kernel,dtype", [("widen", "bfloat16"), ("widen", "float32"), ("pairs", "bfloat16")])
def test_every_shape_at_every_row_count(kernel, dtype, capsys):
    results = bench.main(["--rows", "1,13", "--reps", "1", "--memory-mb", "1", "--dtype", dtype, "--kernel", kernel])
    assert [(r, s) for r, s, _, _ in results] == [(r, s) for r in (1, 13) for s, _, _ in bench.SHAPES]
    assert all(t_dnn > 0 and t_sk > 0 for _, _, t_dnn, t_sk in results)
    assert "speed-up" in capsys.readouterr().out


def test_pairs_need_bf16_weights():
    with pytest.raises(SystemExit, match="bfloat16"):
        bench.main(["--kernel", "pairs", "--dtype", "float32"])
