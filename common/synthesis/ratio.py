"""How many synthetic HE samples bring a training set to a target HE:NHE ratio.

A ratio is written "HE:NHE": "1:2" (the paper's semi-balanced set, the default), "1:1" (balanced)
or "none" (no synthesis). Counts are in whatever unit the caller trains on (cases or ROIs), as
long as real and synthetic samples use the same one. Synthesis only ever adds HE samples: a set
that already meets the ratio gets none, and ratios that would make HE the majority are refused.
"""

from __future__ import annotations

import math
import re

from common.errors import ConfigError

NONE_WORDS = ("none", "off", "0")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")


def parse_ratio(text) -> tuple[float, float] | None:
    """'1:2' -> (1.0, 2.0); 'none' -> None. Raises ConfigError for anything else."""
    if text is None:
        return None
    value = str(text).strip().lower()
    if value in NONE_WORDS:
        return None
    match = _RATIO.match(value)
    if not match:
        raise ConfigError(f"synthesis ratio {text!r}: expected HE:NHE such as '1:2' or '1:1', or 'none'")
    he, nhe = float(match.group(1)), float(match.group(2))
    if he <= 0 or nhe <= 0:
        raise ConfigError(f"synthesis ratio {text!r}: both sides must be > 0 (use 'none' for no synthesis)")
    if he > nhe:
        raise ConfigError(f"synthesis ratio {text!r}: HE would outnumber NHE; use at most '1:1'")
    return he, nhe


def synthetic_needed(n_he: int, n_nhe: int, ratio="1:2") -> int:
    """Synthetic HE samples to add so that HE / NHE reaches the ratio (0 when already there).

    >>> synthetic_needed(20, 80, "1:2"), synthetic_needed(20, 80, "1:1"), synthetic_needed(50, 50, "1:2")
    (20, 60, 0)
    """
    if n_he < 0 or n_nhe < 0:
        raise ValueError(f"counts must be >= 0, got HE {n_he}, NHE {n_nhe}")
    parsed = parse_ratio(ratio)
    if parsed is None:
        return 0
    he, nhe = parsed
    # Round up (reach at least the ratio); the epsilon keeps exact products such as 90 * 1/3
    # from becoming 30.000000001 -> 31 through float error.
    target = math.ceil(n_nhe * he / nhe - 1e-9)
    return max(0, target - n_he)
