"""CUDA graphs for decode steps: a whole forward pass launched as one.

A decode step is hundreds of small kernels whose launch cost, from Python,
exceeds their run time; a captured graph replays them all with one launch.
A graph fixes shapes and addresses, so each padded batch size (bucket) gets
its own graph, all reading one set of static input buffers and writing one
static output, and all sharing one memory pool (captured largest first, so
the smaller ones fit in what the largest took). A step of n single-token
decodes copies its inputs into the buffers, pads to the next bucket, replays
and reads the first n rows; every other step runs eagerly.

Padding rows have slot -1 (the store skips them), seq_len 0 (attention gives
zeros) and a block table of zeros, so they touch no block of the pool and no
real row. A replay cannot change host values, so the metadata's host fields
are fixed at capture to upper bounds (max_model_len) and cascade attention
is off: the backend must take real lengths from the device tensors, which the
triton backend does. The torch backend reads per-step host values and cannot
skip slot -1, so with it every step runs eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedllm.model.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 256


def capture_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_SIZE) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 8, up to and including min(max_num_seqs, limit)."""
    cap = min(max_num_seqs, limit)
    return [s for s in (1, 2, 4, *range(8, limit + 1, 8)) if s < cap] + [cap]


class DecodeGraphs:
    """Static buffers and one captured graph per bucket; `fits` + `run` replace the model call of a decode step."""

    def __init__(self, sizes: list[int], max_model_len: int, block_size: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.sizes = sorted(sizes)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        b = self.sizes[-1]
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)  # one query per row, always
        self.hidden = torch.zeros(b, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bucket(self, n: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def metadata(self, b: int) -> AttentionMetadata:
        """The bucket's metadata: views of the static buffers, host fields at their upper bounds."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            num_decodes=b,
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[self.max_model_len] * b,
            max_seq_len=self.max_model_len,
            max_query_len=1,
            num_common_prefix_blocks=0,
        )

    def fits(self, meta: AttentionMetadata) -> bool:
        """A step can replay a graph when all its sequences are single-token decodes and a bucket holds them."""
        return meta.num_decodes == meta.num_seqs <= self.sizes[-1] and meta.block_tables.shape[1] <= self.max_blocks

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy a step's inputs into the static buffers and pad them to its bucket; returns the bucket."""
        n = meta.num_seqs
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)  # padding rows keep earlier ids and positions: valid, and never read
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].zero_()
        self.block_tables[:b].zero_()
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        return b

    def capture(self, model, kv_caches: list[torch.Tensor]) -> None:
        """One graph per bucket, largest first, over buffers that hold only padding rows."""
        pool = None
        for b in reversed(self.sizes):
            args = (self.input_ids[:b], self.positions[:b], kv_caches, self.metadata(b))
            self.hidden[:b] = model(*args)  # warm-up, outside the graph: kernels compile and autotune here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:b] = model(*args)
            pool = pool if pool is not None else graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's hidden states [n, hidden]: a view of the static output, valid until the next replay."""
        self.graphs[self.load(input_ids, positions, meta)].replay()
        return self.hidden[: meta.num_seqs]


@torch.inference_mode()
def capture_decode_graphs(runner, max_num_seqs: int, max_model_len: int) -> DecodeGraphs | None:
    """Capture the runner's decode graphs once its KV pool exists; None where graphs cannot serve."""
    if not runner.attn_backend.cuda_graph_safe:
        logger.info("CUDA graphs need the triton attention backend; decode steps run eagerly")
        return None
    if not getattr(runner.model, "cuda_graph_safe", True):
        logger.info("%s reads device values on the host in its forward pass; decode steps run eagerly",
                    type(runner.model).__name__)
        return None
    t0 = time.perf_counter()
    free_before = torch.cuda.mem_get_info(runner.device)[0]
    graphs = DecodeGraphs(capture_sizes(max_num_seqs), max_model_len, runner.block_size,
                          runner.model.config.hidden_size, runner.dtype, runner.device)
    graphs.capture(runner.model, runner.kv_caches)
    used = free_before - torch.cuda.mem_get_info(runner.device)[0]
    logger.info("captured %d CUDA graphs for decode batch sizes %s in %.2fs (%.0f MiB)",
                len(graphs.sizes), graphs.sizes, time.perf_counter() - t0, used / (1 << 20))
    return graphs
