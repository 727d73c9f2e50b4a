#!/usr/bin/env python3
"""Compares two eventsync-bench JSON results (``--out``) figure by figure.

    python3 scripts/bench_compare.py before.json after.json [--only SUBSTRING ...]

Prints every numeric figure present in both files as ``path  before  after  after/before``
(paths like ``catchup/0/daemon/events_per_cpu_sec``), so a script or a reader can see what
moved between two builds or two machines.  ``--only`` keeps the paths that contain one of
the given substrings.  Exits 2 when a file cannot be read.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves of a JSON value, keyed by their slash-separated path."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from leaves(inner, f"{path}/{i}" if path else str(i))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--only"]
    if len(args) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    only = args[2:] if "--only" in argv else []
    try:
        with open(args[0]) as f:
            before = dict(leaves(json.load(f)))
        with open(args[1]) as f:
            after = dict(leaves(json.load(f)))
    except (OSError, ValueError) as exc:
        print(f"bench_compare: {exc}", file=sys.stderr)
        return 2
    rows = [
        (p, before[p], after[p])
        for p in before
        if p in after and (not only or any(o in p for o in only)) and not p.startswith("args/")
    ]
    width = max((len(p) for p, _, _ in rows), default=10)
    for path, b, a in rows:
        ratio = f"{a / b:.2f}x" if b else "-"
        print(f"{path:<{width}}  {b:>14,.2f}  {a:>14,.2f}  {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
