"""Tensor parallelism (worker/parallel.py, model/tensor_parallel.py): TP=N gives TP=1's greedy tokens, and logits
within float32 tolerance (the all-reduce sums in another order); ranks started apart over loopback TCP give the
same; a rank that dies fails the engine with an error that names it, never a hang.

Each engine here starts N processes on a 2-core machine, so the models are tiny and the prompts short.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.model.loader import iter_weights, resolve_model
from pagedllm.model.synthetic import word_level_tokenizer
from pagedllm.model.tensor_parallel import TPShard, check_tensor_parallel
from pagedllm.worker.model_runner import ModelRunner, StepInput

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311]]


def _tiny_dir(path, heads: int, kv_heads: int, tie: bool = False, bias: bool = False) -> str:
    """bias: every projection has one (q/k/v split over the ranks; o_proj's and down_proj's added by rank 0 alone)."""
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)  # sharper logits: fewer near-ties in greedy decoding
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    word_level_tokenizer(cfg.vocab_size).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> str:
    """12 query heads over 6 KV heads: split evenly at TP=2 and TP=3."""
    return _tiny_dir(tmp_path_factory.mktemp("tp-gqa"), 12, 6)


@pytest.fixture(scope="module")
def gqa_ref(gqa_dir):
    """TP=1's greedy outputs of PROMPTS on gqa_dir, in this process."""
    return _greedy(_llm(gqa_dir, 1))


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory) -> str:
    """4 query heads over 1 KV head, tied embeddings: at TP=2 each rank keeps a copy of the KV head."""
    return _tiny_dir(tmp_path_factory.mktemp("tp-mqa"), 4, 1, tie=True)


def _greedy(llm: LLM, prompts=PROMPTS, max_tokens: int = 8):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same(ref, got) -> None:
    for a, b in zip(ref, got):
        assert b.token_ids == a.token_ids
        first_a, first_b = a.logprobs[0], b.logprobs[0]
        assert list(first_a) == list(first_b)
        for tok in first_a:
            assert first_b[tok].logprob == pytest.approx(first_a[tok].logprob, abs=1e-4)


def _llm(path: str, tp: int, **kw) -> LLM:
    # The reference in this process; a tensor-parallel rank 0 in a core process (it takes its share of the cores).
    return LLM(path, dtype="float32", num_kv_blocks=48, block_size=8, tensor_parallel_size=tp, core_process=tp > 1, **kw)


# --- the split itself, in one process: ranks as threads that sum through a barrier ----------------------------------
class _ThreadRanks:
    """N ranks in one process: all_reduce sums the ranks' tensors in rank order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: list = [None] * size
        self.barrier = threading.Barrier(size)

    def group(self, rank: int):
        ranks = self

        class Group:
            def __init__(self):
                self.rank, self.size = rank, ranks.size

            def shard(self):
                return TPShard(rank, ranks.size, self.all_reduce)

            def all_reduce(self, x):
                ranks.parts[rank] = x.clone()
                ranks.barrier.wait()
                total = sum(ranks.parts[1:], ranks.parts[0].clone())
                ranks.barrier.wait()
                return x.copy_(total)

            def send(self, msg):  # rank 0's messages: these ranks are driven by the test itself
                pass

        return Group()


def _runner(path: str, tp=None, dummy: bool = False) -> ModelRunner:
    source = resolve_model(path)
    weights = None if dummy else (lambda shard: iter_weights(source, shard))
    runner = ModelRunner(source.config, weights, device=torch.device("cpu"), dtype=torch.float32, block_size=8, tp=tp)
    runner.allocate_kv_cache(8)
    return runner


def _prompt_step(tokens: list[int]) -> StepInput:
    n = len(tokens)
    return StepInput(list(tokens), list(range(n)), [0, n], [n], 0, n, [list(range(n))], [[list(range(-(-n // 8)))]])


def _sharded_logits(path: str, size: int, step: StepInput, dummy: bool = False) -> torch.Tensor:
    ranks = _ThreadRanks(size)
    runners = [_runner(path, ranks.group(r), dummy) for r in range(size)]
    assert all(r.num_kv_heads == runners[0].num_kv_heads for r in runners)
    outs: list = [None] * size
    threads = [threading.Thread(target=lambda r=r: outs.__setitem__(r, runners[r].forward(step))) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert torch.equal(outs[0], outs[-1])  # every rank ends the forward with the same hidden states
    return runners[0].model.compute_logits(outs[0])


@pytest.mark.parametrize("heads,kv_heads,size,bias", [(12, 6, 3, False), (4, 2, 4, False), (4, 1, 2, False),
                                                    (12, 6, 2, True)])
def test_sharded_forward_matches_the_whole_model(tmp_path, heads, kv_heads, size, bias):
    path = _tiny_dir(tmp_path, heads, kv_heads, bias=bias)
    ref = _runner(path)
    step = _prompt_step(PROMPTS[1])
    want = ref.model.compute_logits(ref.forward(step))
    torch.testing.assert_close(_sharded_logits(path, size, step), want, rtol=1e-4, atol=1e-4)


def test_dummy_weights_are_the_same_model_at_every_size(tmp_path):
    path = _tiny_dir(tmp_path, 12, 6)
    ref = _runner(path, dummy=True)
    step = _prompt_step(PROMPTS[1])
    want = ref.model.compute_logits(ref.forward(step))
    torch.testing.assert_close(_sharded_logits(path, 2, step, dummy=True), want, rtol=1e-4, atol=1e-4)


def test_the_loader_reads_only_a_ranks_slice(gqa_dir):
    source = resolve_model(gqa_dir)
    shard = lambda name: (1, 16, 8) if "o_proj.weight" in name else (0, 8, 8) if "q_proj.weight" in name else None
    shapes = {name: tuple(t.shape) for name, t in iter_weights(source, shard)}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (8, 48)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (48, 8)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (48, 48)


def test_sizes_that_do_not_split_the_model_are_refused():
    check_tensor_parallel(9, 3, 1536, 3)
    check_tensor_parallel(4, 1, 96, 4)  # the KV head is replicated
    with pytest.raises(ValueError, match="attention heads"):
        check_tensor_parallel(9, 3, 1536, 2)
    with pytest.raises(ValueError, match="KV heads"):
        check_tensor_parallel(6, 2, 96, 3)
    with pytest.raises(ValueError, match="intermediate"):
        check_tensor_parallel(12, 6, 100, 3)
    with pytest.raises(ValueError, match="distributed_init_method"):
        EngineConfig(distributed_init_method="localhost:1234")


def test_an_unsupported_family_is_refused_before_any_rank_starts(tmp_path):
    cfg = transformers.Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    from pagedllm.model.synthetic import build_model_dir

    path = build_model_dir(str(tmp_path / "gemma"), cfg, dtype="float32")
    with pytest.raises(ValueError, match="not supported for model type 'gemma2'.*llama"):
        LLM(path, dtype="float32", num_kv_blocks=16, tensor_parallel_size=2, core_process=False)


# --- the engine, with its ranks in processes ---------------------------------------------------------------------------
def test_tp2_and_tp3_give_tp1s_greedy_tokens(gqa_dir, gqa_ref):
    for size in (2, 3):
        llm = _llm(gqa_dir, size)
        _assert_same(gqa_ref, _greedy(llm))
        llm.engine.shutdown()


def test_gloo_all_reduce_gives_tp1s_greedy_tokens(gqa_dir, gqa_ref, monkeypatch):
    """Where the ranks cannot share memory they sum over gloo (the ranks above, all on this host, share it)."""
    monkeypatch.setenv("PAGEDLLM_NO_SHM_ALL_REDUCE", "1")
    llm = _llm(gqa_dir, 2)
    _assert_same(gqa_ref, _greedy(llm))
    llm.engine.shutdown()


def test_data_parallel_cores_of_tensor_parallel_groups_give_tp1s_greedy_tokens(gqa_dir, gqa_ref, monkeypatch):
    llm = _llm(gqa_dir, 2, data_parallel_size=2)  # two cores, each rank 0 of its own pair, on ports of their own
    _assert_same(gqa_ref, _greedy(llm))
    assert all(routed for routed, _ in llm.engine.client.routing_counts())
    llm.engine.shutdown()
    with pytest.raises(ValueError, match="distributed_init_method unset"):
        EngineConfig(tensor_parallel_size=2, data_parallel_size=2, distributed_init_method="tcp://127.0.0.1:29500")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="unset MASTER_ADDR"):
        _llm(gqa_dir, 2, data_parallel_size=2)


def test_replicated_kv_heads_give_tp1s_greedy_tokens(mqa_dir):
    ref = _greedy(_llm(mqa_dir, 1))
    llm = _llm(mqa_dir, 2)
    _assert_same(ref, _greedy(llm))
    # Copy-on-write on every rank: n > 1 shares the prompt's last block, which each completion then writes.
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == ref[0].token_ids[:6]
    llm.engine.shutdown()


@pytest.mark.slow
def test_smollm2_at_tp3_gives_tp1s_greedy_tokens(default_model_path):
    """The default model: 9 query heads over 3 KV heads, 1536 intermediate features."""
    prompts = [[1, 9690, 198, 2683, 314, 253], [1, 4093, 1759, 282, 4286, 30], list(range(100, 130))]
    kw = dict(dtype="float32", num_kv_blocks=32, block_size=16, max_model_len=256)
    ref = _greedy(LLM(default_model_path, core_process=False, **kw), prompts, 16)
    llm = LLM(default_model_path, tensor_parallel_size=3, **kw)
    _assert_same(ref, _greedy(llm, prompts, 16))
    llm.engine.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_apart_over_loopback_tcp(gqa_dir, gqa_ref):
    init = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers = [subprocess.Popen([sys.executable, "-m", "pagedllm.worker.tp_worker", "--rank", str(r), "--world-size", "2",
                                 "--init-method", init, "--local-rank", str(r), "--local-world-size", "2"], env=env)
               for r in (1,)]
    try:
        llm = _llm(gqa_dir, 2, distributed_workers="external", distributed_init_method=init)
        _assert_same(gqa_ref, _greedy(llm))
        llm.engine.shutdown()
        assert [w.wait(30) for w in workers] == [0]  # rank 0 told them to stop
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the rank's process in /proc")
def test_a_killed_rank_fails_the_engine_with_its_name(gqa_dir):
    llm = _llm(gqa_dir, 2)
    _greedy(llm)
    (worker,) = _children(llm.engine.info.pid)
    os.kill(worker, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 .*SIGKILL"):
        _greedy(llm)
    assert time.monotonic() - t0 < 30
    llm.engine.shutdown()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the rank's process in /proc")
def test_a_rank_killed_while_generating_fails_the_engine_with_its_name(gqa_dir):
    """Killed during a step, as likely as not while rank 0 waits for it inside an all-reduce."""
    llm = _llm(gqa_dir, 2)
    _greedy(llm)
    (worker,) = _children(llm.engine.info.pid)
    killer = threading.Timer(0.3, os.kill, (worker, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 .*SIGKILL"):
        for _ in range(100):
            _greedy(llm, max_tokens=64)
    assert time.monotonic() - t0 < 30
    killer.join()
    llm.engine.shutdown()
