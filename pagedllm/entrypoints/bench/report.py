"""How bench commands hand out their figures: a table for people on stdout, JSON for machines with --json."""

from __future__ import annotations

import json

WIDTH = 60


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """rows: (label, value); a value of None prints as a section line named by the label."""
    print(f" {title} ".center(WIDTH, "="))
    for label, value in rows:
        if value is None:
            print(f" {label} ".center(WIDTH, "-"))
        else:
            print(f"{label + ':':<44}{_fmt(value):>{WIDTH - 44}}")
    print("=" * WIDTH)


def write_json(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)
