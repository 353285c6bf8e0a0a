"""How every benchmark hands out its figures: JSON on stdout, and in a file with --json."""

from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
