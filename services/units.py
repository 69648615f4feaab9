"""Display units shared by pages and the CLI: byte sizes, counts and durations."""

from __future__ import annotations

import math


def human_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 KB``, ``2.3 GB`` (decimal units); ``?`` when unknown."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float | None) -> str:
    """``21.9M``, ``135M``, ``1.2B`` (parameters, tokens)."""
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}"
    return f"{n:.0f}"


def gigabytes(x: float | None) -> str:
    """``512.0 MB``, ``1.23 GB``, ``23.4 GB`` for a size given in GB (memory estimates)."""
    if x is None:
        return "?"
    return f"{x * 1000:.1f} MB" if x < 1 else f"{x:.2f} GB" if x < 10 else f"{x:.1f} GB"


def clock(seconds: float | None) -> str:
    """``H:MM:SS`` (elapsed time, ETA); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min`` (estimates in prose); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600} h {s // 60 % 60:02d} min" if s >= 3600 else \
        f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"
