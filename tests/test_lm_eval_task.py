"""The local lm-eval task (benchmarks/data/lm_eval_task) and lm_eval_check.py's direct side, without lm-eval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import lm_eval_check

TASK_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "lm_eval_task"


def test_data_set_loads():
    items = lm_eval_check.load_items()
    assert len(items) == 40
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert it["question"] and it["question"] == it["question"].strip()
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert all(c and c == c.strip() for c in it["choices"])  # the task's target_delimiter adds the space
        assert 0 <= it["answer"] < 4
    assert len({it["answer"] for it in items}) == 4  # the right answer is not always in one place


def test_task_yaml_parses():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((TASK_DIR / "pagedllm_mc.yaml").read_text())
    assert cfg["task"] == lm_eval_check.TASK_NAME
    assert cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_path"] == "json"
    data = Path(__file__).resolve().parent.parent / cfg["dataset_kwargs"]["data_files"]
    assert data == lm_eval_check.DATA and data.is_file()
    assert cfg["test_split"] == "train"  # a single JSON file loads as the train split
    assert cfg["target_delimiter"] == lm_eval_check.TARGET_DELIMITER
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc"]


def test_encode_pair_moves_trailing_space_to_continuation(tiny_model_dir):
    from pagedllm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ctx, cont = lm_eval_check.encode_pair(tok, "The capital of France is ", "Paris")
    whole = tok("The capital of France is Paris", add_special_tokens=False).input_ids
    assert ctx + cont == list(whole)
    assert ctx == list(tok("The capital of France is", add_special_tokens=False).input_ids)


def test_direct_results_on_tiny_model(tiny_model_dir):
    from pagedllm import LLM

    items = lm_eval_check.load_items()[:3]
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16)
    try:
        res = lm_eval_check.direct_results(llm, items)
    finally:
        llm.engine.shutdown()
    assert len(res["loglikelihoods"]) == 3 and all(len(row) == 4 for row in res["loglikelihoods"])
    assert all(math.isfinite(x) and x < 0 for row in res["loglikelihoods"] for x in row)
    assert res["predictions"] == [max(range(4), key=row.__getitem__) for row in res["loglikelihoods"]]
    assert res["correct"] == [int(p == it["answer"]) for p, it in zip(res["predictions"], items)]
    assert res["acc"] == sum(res["correct"]) / 3
