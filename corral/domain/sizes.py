"""Sizes as people write them (`512M`, `2G`, `1.5GiB`): KiB-based units. Pure; the CLI
parses its options with these without loading the wire models (corral.api.common
re-exports them)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def _parse_size(text: str, default_unit: str, examples: str) -> float:
    """A size in KiB-based units: its value in bytes for `default_unit` 'b', in MiB
    for 'm'."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: {examples})")
    value, unit = float(m.group(1)), (m.group(2) or default_unit)[0].lower()
    exponent = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    base = {"b": 0, "m": 2}[default_unit]
    return value * 1024.0 ** (exponent - base)


def parse_memory_mb(text: str) -> int:
    """'512' and '512M' are megabytes; '2G' is 2048 MB; '1.5GiB' is 1536 MB."""
    return int(_parse_size(text, "m", "512M, 2G"))


def parse_bytes(text: str) -> int:
    """'4M' is 4 MiB, '1G' 1 GiB, '512K' 512 KiB; a plain number is bytes."""
    return int(_parse_size(text, "b", "512K, 64M, 1G"))
