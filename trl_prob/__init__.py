"""trl-prob: the probability-based SFT objectives of "Beyond Log Likelihood" inside TRL, on a schedule."""

from __future__ import annotations

import os

__version__ = "0.1.0"

TESTED_TRL = ("1.16.0", "1.17.0")  # [low, high)


def _check_trl() -> None:
    from packaging.version import Version

    import trl

    low, high = (Version(v) for v in TESTED_TRL)
    if not low <= Version(trl.__version__) < high and os.environ.get("TRL_PROB_ALLOW_UNTESTED_TRL") != "1":
        raise ImportError(
            f"trl-prob is tested with trl>={low},<{high}; found trl {trl.__version__}. It relies on TRL's fused "
            f"log-prob head, whose contract may differ. Install `pip install 'trl>={low},<{high}'`, or set "
            "TRL_PROB_ALLOW_UNTESTED_TRL=1 to try anyway (tests/test_trl_contract.py tells whether it still holds)."
        )


_check_trl()

from .config import ProbSFTConfig  # noqa: E402
from .objectives import Objective, get_objective  # noqa: E402
from .stats import TokenProbStats  # noqa: E402
from .trainer import ProbObjectiveMixin, ProbSFTTrainer  # noqa: E402

__all__ = [
    "Objective",
    "ProbObjectiveMixin",
    "ProbSFTConfig",
    "ProbSFTTrainer",
    "TokenProbStats",
    "get_objective",
]
