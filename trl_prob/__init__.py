"""trl-prob: the probability-based SFT objectives of "Beyond Log Likelihood" inside TRL, on a schedule.

The exports load on first use (as TRL's do): ``import trl_prob`` imports neither torch nor TRL.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

TESTED_TRL = ("1.16.0", "1.17.0")  # [low, high)

_EXPORTS = {
    "Objective": "objectives",
    "get_objective": "objectives",
    "TokenProbStats": "stats",
    "ProbSFTConfig": "config",
    "ProbObjectiveMixin": "trainer",
    "ProbSFTTrainer": "trainer",
}
__all__ = sorted(_EXPORTS)


def check_trl_version() -> None:
    """Refuse a TRL release outside the tested range (TRL_PROB_ALLOW_UNTESTED_TRL=1 to try anyway)."""
    from importlib.metadata import version

    from packaging.version import Version

    found = version("trl")
    low, high = (Version(v) for v in TESTED_TRL)
    if not low <= Version(found) < high and os.environ.get("TRL_PROB_ALLOW_UNTESTED_TRL") != "1":
        raise ImportError(
            f"trl-prob is tested with trl>={low},<{high}; found trl {found}. It relies on TRL's fused "
            f"log-prob head, whose contract may differ. Install `pip install 'trl>={low},<{high}'`, or set "
            "TRL_PROB_ALLOW_UNTESTED_TRL=1 to try anyway (tests/test_trl_contract.py tells whether it still holds)."
        )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
