"""Engine flags on the command line map onto EngineConfig as vLLM names them."""

from __future__ import annotations

import argparse

from pagedllm.config import EngineConfig
from pagedllm.entrypoints.args import add_engine_args, engine_options


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_options(parser.parse_args(list(argv)))


def test_prefix_caching_is_on_by_default_and_can_be_turned_off():
    assert parse()["enable_prefix_caching"] is True
    assert parse("--no-enable-prefix-caching")["enable_prefix_caching"] is False


def test_engine_flags_build_a_valid_config():
    opts = parse("--block-size", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                 "--kv-cache-memory", "1GiB", "--dtype", "float32", "--max-model-len", "1024")
    cfg = EngineConfig(**opts)
    assert (cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.kv_cache_bytes) == (32, 8, 512, 1 << 30)
