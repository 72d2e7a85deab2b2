"""Sizes in bytes: parse "4MiB" or "1.5 GB", and print sizes the same way everywhere."""
from __future__ import annotations

import re
from decimal import Decimal
from numbers import Integral

_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20,
          "gb": 10**9, "gib": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def parse_size(text: str | int) -> int:
    """Bytes from "4MiB", "1.5 GB", "512kb", "4096" (plain numbers are bytes).

    Units (case-insensitive): B, KB = 1000, KiB = 1024, MB, MiB, GB, GiB. Decimals are allowed;
    a fractional byte count is rounded down, so a parsed budget is never larger than asked.
    """
    if _is_int(text):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
        return int(text)
    if not isinstance(text, str):
        raise TypeError(f"a size must be a string such as '4MiB' or an int, got {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}: expected a number with an optional unit "
                         "B, KB, KiB, MB, MiB, GB or GiB, such as '4MiB' or '1.5GB'")
    return int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """Human-readable binary size: 512 B, 1.5 KiB, 12.25 MiB, 2 GiB."""
    if not _is_int(n):
        raise TypeError(f"format_size needs an int number of bytes, got {n!r}")
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n < 1024:
        return f"{sign}{n} B"
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
                       if n >= s)
    return f"{sign}{n / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"
