"""The CUDA path: graph buckets and padding, KV sizing from GPU memory, options and flags.

What needs no GPU runs on the CPU: the padded static inputs go through the
torch backend (with a store that skips slot -1, as the triton one does) and
must leave the real rows and the pool exactly as an unpadded step does; the
memory arithmetic runs a real profiled step on the CPU under a mocked
torch.cuda memory API. Graph capture and real GPU memory are tested at the
end and skip without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
import transformers

from pagedllm.config import EngineConfig
from pagedllm.entrypoints.args import add_engine_args, engine_options
from pagedllm.entrypoints.cli import main
from pagedllm.model.attention.selector import get_attention_backend
from pagedllm.model.layer_kernels import fused_ops
from pagedllm.model.attention.torch_backend import TorchPagedAttention
from pagedllm.worker import gpu_memory
from pagedllm.worker.cuda_graphs import DecodeGraphs, capture_sizes
from pagedllm.worker.gpu_memory import dummy_prefill, gpu_kv_blocks, kv_cache_budget
from pagedllm.worker.model_runner import ModelRunner, resolve_dtype

GiB = 1 << 30
BLOCK = 4
NUM_BLOCKS = 40
SCRATCH = NUM_BLOCKS - 1  # the last block: where the test store puts slot -1, never in a block table


class SkippingStore(TorchPagedAttention):
    """The torch backend with a store that skips slot -1, as the triton store kernel does.

    The rows still run through attention (seq_len 0); their keys land in a
    scratch block that no sequence owns, so any other write would show.
    """

    def forward(self, q, k, v, kv_cache, meta):
        scratch = SCRATCH * kv_cache.shape[2]
        slots = torch.where(meta.slot_mapping < 0, scratch, meta.slot_mapping)
        return super().forward(q, k, v, kv_cache, dataclasses.replace(meta, slot_mapping=slots))


def tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=512, hidden_size=72, intermediate_size=128, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    with fused_ops(False):  # as on CUDA: torch ops, and the backend stores the keys and values
        r = ModelRunner(tiny_config(), None, device=torch.device("cpu"), dtype=torch.float32, block_size=BLOCK,
                        attn_backend=SkippingStore)
    r.allocate_kv_cache(NUM_BLOCKS)
    return r


def prefilled(runner, lengths, seed):
    """Sequences of the given lengths computed into the pool (blocks scattered), as fake scheduled requests."""
    rng = random.Random(seed)
    free = list(range(SCRATCH))
    rng.shuffle(free)
    seqs = []
    for n in lengths:
        table = [free.pop() for _ in range(-(-(n + 1) // BLOCK))]  # room for one decode token
        tokens = [rng.randrange(512) for _ in range(n + 1)]
        seqs.append(SimpleNamespace(tokens=tokens, table=table))
    for c in runner.kv_caches:
        c.zero_()
    runner.compute_logits([step(s, 0, len(s.tokens) - 1) for s in seqs])
    return seqs


def step(seq, start, n):
    return SimpleNamespace(start_pos=start, num_new_tokens=n, token_ids=seq.tokens[start:start + n],
                           block_tables=[seq.table], needs_sample=True, request=None)


def decode(seqs):
    return [step(s, len(s.tokens) - 1, 1) for s in seqs]


def test_capture_sizes_cover_max_num_seqs_up_to_256():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(1000)[-1] == 256
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]


def test_a_step_goes_to_the_smallest_bucket_that_holds_it(runner):
    graphs = DecodeGraphs(capture_sizes(20), 64, BLOCK, 72, torch.float32, torch.device("cpu"))
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 20)] == [1, 2, 4, 4, 8, 16, 16, 20, 20]
    seqs = prefilled(runner, [5, 3, 9], seed=0)
    assert graphs.fits(runner._prepare(decode(seqs))[2])
    mixed = [step(seqs[0], 0, 2), *decode(seqs[1:])]
    assert not graphs.fits(runner._prepare(mixed)[2])  # a chunk of 2 tokens: eager


def test_too_many_decodes_run_eagerly():
    graphs = DecodeGraphs([1, 2], 64, BLOCK, 72, torch.float32, torch.device("cpu"))
    meta = SimpleNamespace(num_decodes=3, num_seqs=3, block_tables=torch.zeros(3, 1))
    assert not graphs.fits(meta)


def run_padded(runner, graphs, seqs):
    """The graphed step without the graph: load the static buffers, run the bucket's metadata eagerly."""
    input_ids, positions, meta, _, _ = runner._prepare(decode(seqs))
    assert graphs.fits(meta)
    b = graphs.load(input_ids, positions, meta)
    hidden = runner.model(graphs.input_ids[:b], graphs.positions[:b], runner.kv_caches, graphs.metadata(b))
    return b, hidden


@pytest.mark.parametrize("lengths", [[6], [5, 3, 9], [13, 1, 7, 22, 2]])
def test_padded_decode_gives_the_unpadded_rows_and_writes_only_their_slots(runner, lengths):
    graphs = DecodeGraphs(capture_sizes(8), 64, BLOCK, 72, torch.float32, torch.device("cpu"))
    seqs = prefilled(runner, lengths, seed=len(lengths))
    before = [c.clone() for c in runner.kv_caches]
    input_ids, positions, meta, _, _ = runner._prepare(decode(seqs))
    eager = runner.model(input_ids, positions, runner.kv_caches, meta)
    eager_pool = [c.clone() for c in runner.kv_caches]

    for c, b in zip(runner.kv_caches, before):
        c.copy_(b)
    bucket, padded = run_padded(runner, graphs, seqs)
    n = len(seqs)
    assert bucket == graphs.bucket(n) and padded.shape[0] == bucket
    torch.testing.assert_close(padded[:n], eager, rtol=1e-5, atol=1e-5)
    for c, e in zip(runner.kv_caches, eager_pool):
        torch.testing.assert_close(c[:, :SCRATCH], e[:, :SCRATCH], rtol=1e-5, atol=1e-5)


def test_a_smaller_step_after_a_larger_one_resets_the_padding_rows(runner):
    graphs = DecodeGraphs(capture_sizes(8), 64, BLOCK, 72, torch.float32, torch.device("cpu"))
    big = prefilled(runner, [4, 8, 12, 16, 20, 3], seed=7)
    assert run_padded(runner, graphs, big)[0] == 8
    small = prefilled(runner, [9, 2, 5], seed=8)
    input_ids, positions, meta, _, _ = runner._prepare(decode(small))
    eager = runner.model(input_ids, positions, runner.kv_caches, meta)
    small = prefilled(runner, [9, 2, 5], seed=8)  # the same pool again
    b, padded = run_padded(runner, graphs, small)
    assert b == 4
    assert graphs.slot_mapping[3].item() == -1 and graphs.seq_lens[3].item() == 0
    assert not graphs.block_tables[3].any() and not graphs.block_tables[:3, 3:].any()
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)


def test_graph_metadata_is_a_plain_decode_with_host_bounds():
    graphs = DecodeGraphs([1, 2, 4], 50, BLOCK, 72, torch.float32, torch.device("cpu"))
    meta = graphs.metadata(4)
    assert graphs.max_blocks == 13 and tuple(meta.block_tables.shape) == (4, 13)
    assert meta.num_decodes == meta.num_seqs == 4 and meta.num_common_prefix_blocks == 0
    assert meta.max_seq_len == 50 and meta.seq_lens_cpu == [50] * 4 and meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.slot_mapping.data_ptr() == graphs.slot_mapping.data_ptr()  # views: a replay sees what load() wrote


# --- memory ------------------------------------------------------------------
def test_kv_budget_is_the_utilization_share_minus_the_peak():
    # 80 GiB card; after the step 20 GiB free, torch holds 50 GiB, so 10 GiB is the context and other processes.
    p = kv_cache_budget(80 * GiB, 20 * GiB, 50 * GiB, 45 * GiB, 0.9)
    assert (p.budget, p.peak, p.kv_bytes) == (72 * GiB, 55 * GiB, 17 * GiB)
    assert kv_cache_budget(80 * GiB, 20 * GiB, 50 * GiB, 45 * GiB, 0.5).kv_bytes < 0


def test_dummy_prefill_spreads_the_tokens_with_single_tokens_first():
    ids, pos, meta = dummy_prefill(10, 4, 100, BLOCK, torch.device("cpu"))
    assert meta.seq_lens_cpu == [2, 2, 3, 3] and ids.shape[0] == 10 and meta.query_start_loc_cpu[-1] == 10
    assert pos.tolist() == [0, 1, 0, 1, 0, 1, 2, 0, 1, 2] and int(meta.slot_mapping.max()) < BLOCK
    _, _, meta = dummy_prefill(5, 256, 100, BLOCK, torch.device("cpu"))
    assert meta.seq_lens_cpu == [1] * 5 and meta.num_decodes == 5
    _, _, meta = dummy_prefill(2048, 2, 100, BLOCK, torch.device("cpu"))
    assert meta.seq_lens_cpu == [100, 100]  # no sequence beyond max_model_len


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory API for an 80 GiB card on which the profiled step used `state`'s figures."""
    state = SimpleNamespace(total=80 * GiB, free=20 * GiB, reserved=50 * GiB, peak=45 * GiB, calls=[])
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: state.calls.append("reset"))
    monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (state.free, state.total))
    monkeypatch.setattr(cuda, "memory_reserved", lambda *a: state.reserved)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: state.peak)
    monkeypatch.setattr(cuda, "empty_cache", lambda: state.calls.append("empty"))
    return state


def test_gpu_kv_blocks_profiles_a_real_step_and_logs_blocks_and_tokens(runner, fake_cuda, monkeypatch, caplog):
    steps = []
    real = gpu_memory.profile_step
    monkeypatch.setattr(gpu_memory, "profile_step", lambda *a: (steps.append(a[1:]), real(*a)))
    cfg = EngineConfig(max_num_batched_tokens=64, max_num_seqs=8)
    with caplog.at_level("INFO", logger="pagedllm.worker.gpu_memory"):
        n = gpu_kv_blocks(runner, cfg, 64)
    assert n == 17 * GiB // runner.bytes_per_block()
    assert steps == [(64, 8, 64)] and fake_cuda.calls == ["reset", "empty"]
    assert f"{n} blocks = {n * BLOCK} tokens" in caplog.text
    runner.allocate_kv_cache(NUM_BLOCKS)  # profile_step dropped the dummy pool


def test_gpu_kv_blocks_says_why_when_nothing_is_left(runner, fake_cuda):
    with pytest.raises(ValueError, match="no GPU memory is left for the KV cache.*gpu_memory_utilization=0.5"):
        gpu_kv_blocks(runner, EngineConfig(gpu_memory_utilization=0.5, max_num_batched_tokens=16), 64)
    runner.allocate_kv_cache(NUM_BLOCKS)


def test_cuda_dtype_is_bfloat16_where_supported(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) is torch.bfloat16
    assert resolve_dtype("float32", cuda) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) is torch.float16


# --- options -----------------------------------------------------------------
def test_gpu_options_are_validated():
    cfg = EngineConfig()
    assert (cfg.gpu_memory_utilization, cfg.enforce_eager, cfg.attention_backend) == (0.9, False, "auto")
    assert not cfg.kv_cache_size_given
    assert EngineConfig(kv_cache_memory="1GiB").kv_cache_size_given and EngineConfig(num_kv_blocks=8).kv_cache_size_given
    EngineConfig(gpu_memory_utilization=1)
    for bad in (0, -0.1, 1.01, float("nan"), "0.9", True, None):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            EngineConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_options(parser.parse_args(list(argv)))


def test_cli_flags():
    d = parse()
    assert (d["gpu_memory_utilization"], d["enforce_eager"], d["attention_backend"]) == (0.9, False, "auto")
    cfg = EngineConfig(**parse("--gpu-memory-utilization", "0.5", "--enforce-eager", "--attention-backend", "torch"))
    assert (cfg.gpu_memory_utilization, cfg.enforce_eager, cfg.attention_backend) == (0.5, True, "torch")
    with pytest.raises(SystemExit):
        parse("--attention-backend", "flash")


def test_cli_rejects_a_utilization_out_of_range(capsys):
    assert main(["generate", "--gpu-memory-utilization", "1.5", "hello"]) == 2
    assert "gpu_memory_utilization must be a fraction in (0, 1]" in capsys.readouterr().err


def test_the_cpu_runs_a_cpu_backend_eagerly(tiny_model_dir):
    from pagedllm import LLM
    from pagedllm.model.attention.cpu_backend import CpuPagedAttention

    expected = CpuPagedAttention if CpuPagedAttention.available() else TorchPagedAttention
    assert get_attention_backend("cpu") is expected
    assert get_attention_backend("cpu", "torch") is TorchPagedAttention
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", num_kv_blocks=64, core_process=False)
    assert llm.engine.core.runner.attn_backend is expected and llm.engine.core.runner.cuda_graphs is None


# --- on a GPU ------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def greedy_tokens(llm, prompts, n=24):
    from pagedllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@cuda_only
def test_cuda_graph_replay_equals_eager_token_for_token(tiny_model_dir):
    pytest.importorskip("pagedllm.model.attention.triton_backend")
    from pagedllm import LLM

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 49000) for _ in range(rng.randint(3, 90))]} for _ in range(13)]
    opts = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=16, core_process=False)
    graphed = LLM(tiny_model_dir, **opts)
    graphs = graphed.engine.core.runner.cuda_graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    replays = []
    run = graphs.run
    graphs.run = lambda *a: (replays.append(a[2].num_seqs), run(*a))[1]
    eager = LLM(tiny_model_dir, enforce_eager=True, **opts)
    assert eager.engine.core.runner.cuda_graphs is None
    for batch in (prompts[:1], prompts[:3], prompts):  # buckets 1, 4 and 16, padded
        assert greedy_tokens(graphed, batch) == greedy_tokens(eager, batch)
    assert replays and {1, 3, 13} <= set(replays)


@cuda_only
def test_gpu_memory_utilization_sizes_the_pool(tiny_model_dir):
    from pagedllm import LLM

    total = torch.cuda.mem_get_info()[1]
    llm = LLM(tiny_model_dir, device="cuda", attention_backend="torch", gpu_memory_utilization=0.3, core_process=False)
    runner = llm.engine.core.runner
    pool = llm.engine.num_blocks * runner.bytes_per_block()
    assert 0 < pool <= 0.3 * total
    assert torch.cuda.memory_allocated() <= 0.3 * total
    assert greedy_tokens(llm, ["Hello there"], 4)[0]
    del llm, runner
    given = LLM(tiny_model_dir, device="cuda", attention_backend="torch", kv_cache_memory="64MiB")
    assert given.engine.num_blocks == (64 << 20) // given.engine.info.bytes_per_block
    with pytest.raises(ValueError, match="no GPU memory is left"):
        LLM(tiny_model_dir, device="cuda", attention_backend="torch", gpu_memory_utilization=1e-4)
