"""The requests every bench command sends: random-token prompts, or prompts read from a JSONL file.

Random prompts are token ids, not text, and every request runs to its output
length (ignore_eos, greedy), so the work done is the same whatever the model
says and whichever engine runs it: the figures of two runs compare.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass

# The default workload: 48 requests, prompts of 32..384 tokens, outputs of 32..192.
DEFAULT_NUM_REQUESTS = 48
DEFAULT_INPUT_LEN = (32, 384)
DEFAULT_OUTPUT_LEN = (32, 192)


@dataclass
class WorkloadConfig:
    num_requests: int | None = None  # None: 48 random prompts, or every line of the dataset
    input_len: tuple[int, int] = DEFAULT_INPUT_LEN
    output_len: tuple[int, int] = DEFAULT_OUTPUT_LEN  # for dataset lines without "output_len" too
    dataset: str | None = None  # JSONL: {"prompt": str} or {"prompt_token_ids": [int]}, optional "output_len"
    seed: int = 0


@dataclass
class Workload:
    prompts: list[dict]  # {"prompt_token_ids": [...]} or {"prompt": str}: what LLM.generate takes
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int | None:
        """Prompt tokens, when every prompt is token ids (text is counted by whoever tokenizes it)."""
        if any("prompt_token_ids" not in p for p in self.prompts):
            return None
        return sum(len(p["prompt_token_ids"]) for p in self.prompts)


def parse_range(text: str) -> tuple[int, int]:
    """'32:384' -> (32, 384); '64' -> (64, 64): an argparse type with a message that says what is wrong."""
    lo, sep, hi = text.partition(":")
    try:
        rng = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length N or a range LO:HI of integers, got {text!r}") from None
    if rng[0] < 1 or rng[0] > rng[1]:
        raise argparse.ArgumentTypeError(f"a length range needs 1 <= LO <= HI, got {text!r}")
    return rng


def make_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    """n random-token prompts and their output lengths: (prompts, output_lens).

    Token ids are drawn from [100, vocab - 100), away from the special tokens
    that usually sit at either end of a vocabulary.
    """
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        prompts.append({"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(rng.randint(*input_len))]})
        outputs.append(rng.randint(*output_len))
    return prompts, outputs


def load_workload(cfg: WorkloadConfig, vocab: int | None) -> Workload:
    """The workload that cfg describes; vocab is needed for random prompts only."""
    if cfg.num_requests is not None and cfg.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {cfg.num_requests}")
    if cfg.dataset is None:
        if vocab is None or vocab <= 200:
            raise ValueError(f"random prompts need a vocabulary of more than 200 tokens, got {vocab}")
        n = cfg.num_requests or DEFAULT_NUM_REQUESTS
        return Workload(*make_workload(n, cfg.input_len, cfg.output_len, vocab, cfg.seed))
    return _read_dataset(cfg)


def _read_dataset(cfg: WorkloadConfig) -> Workload:
    rng = random.Random(cfg.seed)
    prompts, outputs = [], []
    try:
        f = open(cfg.dataset, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the dataset {cfg.dataset!r}: {exc.strerror or exc}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if cfg.num_requests is not None and len(prompts) == cfg.num_requests:
                break
            where = f"{cfg.dataset}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            prompts.append(_dataset_prompt(item, where))
            out = item.get("output_len", None)
            if out is None:
                out = rng.randint(*cfg.output_len)
            elif isinstance(out, bool) or not isinstance(out, int) or out < 1:
                raise ValueError(f"{where}: output_len must be a positive integer, got {out!r}")
            outputs.append(out)
    if not prompts:
        raise ValueError(f"the dataset {cfg.dataset!r} holds no requests")
    if cfg.num_requests is not None and len(prompts) < cfg.num_requests:
        raise ValueError(f"--num-requests {cfg.num_requests} but the dataset {cfg.dataset!r} holds only {len(prompts)}")
    return Workload(prompts, outputs)


def _dataset_prompt(item, where: str) -> dict:
    shape = 'each line must be {"prompt": str} or {"prompt_token_ids": [int, ...]}, with an optional "output_len"'
    if not isinstance(item, dict):
        raise ValueError(f"{where}: {shape}")
    if "prompt_token_ids" in item:
        ids = item["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of integers")
        return {"prompt_token_ids": ids}
    if isinstance(item.get("prompt"), str) and item["prompt"]:
        return {"prompt": item["prompt"]}
    raise ValueError(f"{where}: {shape}")


def add_workload_args(parser: argparse.ArgumentParser, seed_flag: bool = True) -> None:
    """Workload flags; seed_flag=False where the engine's --seed is already there (it then seeds both)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"requests to send (default: {DEFAULT_NUM_REQUESTS} random prompts, or every dataset line)")
    g.add_argument("--input-len", type=parse_range, default=DEFAULT_INPUT_LEN, metavar="N|LO:HI",
                   help="random prompt length in tokens, drawn uniformly from LO..HI (default 32:384)")
    g.add_argument("--output-len", type=parse_range, default=DEFAULT_OUTPUT_LEN, metavar="N|LO:HI",
                   help="output tokens per request, LO..HI (default 32:192); every request runs to it (ignore_eos)")
    g.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help='prompts from a JSONL file: {"prompt": str} or {"prompt_token_ids": [...]}, optional "output_len"')
    if seed_flag:
        g.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths (default 0)")


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(args.num_requests, args.input_len, args.output_len, args.dataset, args.seed)
