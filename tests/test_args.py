"""Engine flags come from EngineConfig's fields: each option is written once, and the CLI cannot drift from it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import pytest

from pagedllm.config import DTYPES, EngineConfig
from pagedllm.engine.scheduler import SchedulerConfig
from pagedllm.entrypoints.args import add_engine_args, cli_fields, engine_config, engine_options, flag_name
from pagedllm.entrypoints.cli import main

OFF_CLI = {"num_kv_blocks", "trust_remote_code"}


def parse(*argv: str, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_args(parser, **defaults)
    return parser.parse_args(list(argv))


def test_every_field_has_help_and_every_cli_field_a_flag():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in fields(EngineConfig):
        assert f.metadata["help"], f.name
        if f.name in OFF_CLI:
            assert not f.metadata["cli"] and flag_name(f) not in flags
        else:
            assert flag_name(f) in flags, f.name
    assert {f.name for f in cli_fields()} == {f.name for f in fields(EngineConfig)} - OFF_CLI


def test_no_flags_give_the_default_config():
    assert engine_config(parse()) == EngineConfig()
    assert set(engine_options(parse())) == {f.name for f in fields(EngineConfig)} - OFF_CLI


def test_non_default_values_round_trip():
    cfg = engine_config(parse(
        "--model", "m.gguf", "--tokenizer", "tok", "--revision", "main", "--load-format", "dummy", "--dtype", "bf16",
        "--device", "cpu", "--max-model-len", "512", "--block-size", "8", "--kv-cache-memory", "1048576",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--no-enable-prefix-caching",
        "--disable-hybrid-kv-cache-manager", "--seed", "7", "--no-core-process", "--attention-backend", "torch",
        "--kv-cache-dtype", "int8", "--gpu-memory-utilization", "0.5", "--enforce-eager"))
    assert cfg == EngineConfig(
        model="m.gguf", tokenizer="tok", revision="main", load_format="dummy", dtype="bf16", device="cpu",
        max_model_len=512, block_size=8, kv_cache_memory=1 << 20, max_num_seqs=4, max_num_batched_tokens=64,
        enable_prefix_caching=False, disable_hybrid_kv_cache_manager=True, seed=7, core_process=False,
        attention_backend="torch", kv_cache_dtype="int8", gpu_memory_utilization=0.5, enforce_eager=True)
    assert engine_config(parse("--kv-cache-memory", "2GiB")).kv_cache_bytes == 2 << 30
    assert engine_config(parse("--enable-prefix-caching", "--core-process")) == EngineConfig()


def test_choices_are_the_configs_own(capsys):
    for name in DTYPES:
        assert engine_config(parse("--dtype", name)).dtype == name
    for flag, bad in (("--dtype", "float64"), ("--device", "tpu"), ("--kv-cache-dtype", "int4"), ("--load-format", "pt")):
        with pytest.raises(SystemExit):
            parse(flag, bad)
        name = flag[2:].replace("-", "_")
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            EngineConfig(**{name: bad})


def test_a_command_may_set_its_own_defaults():
    assert parse(max_model_len=2048).max_model_len == 2048
    assert parse("--max-model-len", "64", max_model_len=2048).max_model_len == 64
    with pytest.raises(AssertionError, match="not engine flags"):
        parse(num_kv_blocks=4)


def test_the_scheduler_takes_its_budgets_from_the_engine_config():
    cfg = EngineConfig(max_num_seqs=3, max_num_batched_tokens=99)
    assert SchedulerConfig.from_engine(cfg, 640) == SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=99, max_model_len=640)


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["bench", "throughput"], ["bench", "memory"]])
def test_every_engine_command_has_every_engine_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    for f in cli_fields():
        assert flag_name(f) in out, (command, f.name)


def test_the_config_imports_no_torch():
    import subprocess

    code = "import sys, pagedllm.config, pagedllm.entrypoints.args; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
