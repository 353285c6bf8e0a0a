"""Engine flags, made from EngineConfig's fields, so that every engine option is written once.

`serve`, `generate` and the `bench` commands that run an engine all take their
"engine" flags from here, as vLLM's do from its EngineArgs. A flag is the field's
name with dashes; its help text and choices are the field's metadata; its type
is the field's annotation. A bool that is on by default gets --x / --no-x, one
that is off gets --x alone: the spellings vLLM uses. Fields with cli=False
(num_kv_blocks, trust_remote_code) are set from Python only.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import Field, fields

from pagedllm.config import EngineConfig


def cli_fields() -> list[Field]:
    """The EngineConfig fields that are command-line flags, in the config's order."""
    return [f for f in fields(EngineConfig) if f.metadata["cli"]]


def flag_name(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """Add the "engine" argument group: one flag per EngineConfig field on the command line.

    defaults: a command's own defaults for some fields (`bench memory`'s max_model_len),
    which their help then gives after the engine's.
    """
    unknown = set(defaults) - {f.name for f in cli_fields()}
    assert not unknown, f"not engine flags: {sorted(unknown)}"
    types = typing.get_type_hints(EngineConfig)
    g = parser.add_argument_group("engine")
    for f in cli_fields():
        text, default = f.metadata["help"], defaults.get(f.name, f.default)
        if isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            g.add_argument(flag_name(f), action=action, default=default, help=text)
            continue
        if f.name in defaults:
            text += "; this command's default: %(default)s"
        elif f.default is not None and "default" not in text:
            text += " (default: %(default)s)"
        g.add_argument(flag_name(f), type=_parser_of(types[f.name]), default=default,
                       choices=f.metadata["choices"], help=text)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine flags of parsed arguments, as EngineConfig's keyword arguments."""
    return {f.name: getattr(args, f.name) for f in cli_fields()}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig that parsed arguments ask for; fields off the command line keep their defaults."""
    return EngineConfig(**engine_options(args))


def _parser_of(annotation: object):
    """What turns a flag's text into the field's value: the annotation's one type besides None.

    A field of several types (kv_cache_memory: int | float | str) takes a string of
    digits as an int (bytes) and any other text as it is, for EngineConfig to parse.
    """
    kinds = [t for t in typing.get_args(annotation) or (annotation,) if t is not type(None)]
    if len(kinds) == 1:
        return kinds[0]
    return _int_or_text


def _int_or_text(text: str) -> int | str:
    return int(text) if text.isdigit() else text
