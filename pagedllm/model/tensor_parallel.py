"""What a model needs to know to hold one rank's share of a tensor-parallel layer, and nothing of processes.

A model built with a `TPShard` keeps only its rank's slice of every
attention and MLP projection: the query heads split evenly, the KV heads
split evenly or, with more ranks than KV heads, replicated (rank r keeps KV
head r * num_kv_heads // size, which is the one its query heads read), and
the MLP's intermediate features split evenly. qkv and gate_up are
column-parallel (each rank computes its own output features); o_proj and
down_proj are row-parallel (each rank multiplies its slice of the input
features, and `all_reduce` sums the partial products over the ranks). The
embedding and the LM head are replicated.

The group itself (torch.distributed, gloo or NCCL) lives in worker/parallel.py,
which hands the model its `all_reduce`; the model knows no group, rank file or
environment variable. A float32 sum over ranks adds the partial products in
another order than one matmul does, so logits move in the last bits against
TP=1; greedy tokens stay the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks in place and returns it

    def split(self, total: int) -> tuple[int, int]:
        """(start, count) of this rank's even share of `total` (query heads, intermediate features)."""
        assert total % self.size == 0, (total, self.size)
        count = total // self.size
        return self.rank * count, count

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank keeps: an even share, or one replicated head."""
        if num_kv_heads % self.size == 0:
            return self.split(num_kv_heads)
        assert self.size % num_kv_heads == 0, (num_kv_heads, self.size)
        return self.rank * num_kv_heads // self.size, 1


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Raise ValueError unless a model with these numbers splits over `size` ranks."""
    if size == 1:
        return
    problems = []
    if num_heads % size:
        problems.append(f"its {num_heads} attention heads")
    if num_kv_heads % size and size % num_kv_heads:
        problems.append(f"its {num_kv_heads} KV heads (they must divide by it, or it by them: then they are replicated)")
    if intermediate_size % size:
        problems.append(f"its MLP's {intermediate_size} intermediate features")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not divide {', '.join(problems)}; "
                         f"use a size that divides the attention heads and the intermediate size")


def row_parallel(project: Callable[[torch.Tensor], torch.Tensor], tp: TPShard | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A row-parallel projection: this rank's partial product, summed over the ranks (as is, without ranks)."""
    if tp is None or tp.size == 1:
        return project
    reduce = tp.all_reduce

    def project_and_reduce(x: torch.Tensor) -> torch.Tensor:
        return reduce(project(x))

    return project_and_reduce
