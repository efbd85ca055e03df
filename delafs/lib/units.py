"""Units every layer shares: the block size and byte/block rounding, and
sizes as people write them ("64M")."""

from __future__ import annotations

import re

BLOCK_SHIFT = 12
BLOCK_SIZE = 1 << BLOCK_SHIFT

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.I)


def round_up(x: int) -> int:
    """``x`` rounded up to a block boundary."""
    return (x + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)


def round_down(x: int) -> int:
    return x & ~(BLOCK_SIZE - 1)


def parse_size(text: str) -> int:
    """'1G', '512M', '64MiB', '1048576' -> bytes (binary multiples).
    ValueError says what was wrong."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 64M, 1G, 1073741824)")
    n = int(m.group(1))
    return n << (10 * " kmgtp".index(m.group(2).lower() or " "))


def format_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 64.0 MiB (binary multiples, as
    parse_size reads them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
