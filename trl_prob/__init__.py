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


# What trl-prob reads from TRL's fused LM head (`FusedCausalLMOutput` fields), and what it asks the head for.
CONTRACT_OUTPUTS = ("log_probs", "label_mask", "entropy", "is_top1", "log_sum_sq_probs")


def trl_contract_problem() -> str | None:
    """What of the TRL contract trl-prob builds on the installed TRL breaks, in a few words, or None if it holds.

    The contract: ``trl.trainer.utils.add_fused_lm_head`` exists and takes ``outputs``; its ``FusedCausalLMOutput``
    carries the per-token fields of :data:`CONTRACT_OUTPUTS`; ``SFTTrainer.compute_loss`` calls the model with
    ``fused_lm_head=True`` and trains ``-outputs.log_probs`` (the field trl-prob rewrites). Signatures, dataclass
    fields and source text only: no model is built. What source text cannot show, the trainer's first-step check does
    (:meth:`trl_prob.trainer.ProbObjectiveMixin.compute_loss`)."""
    import dataclasses
    import inspect

    from trl.trainer import utils

    head = getattr(utils, "add_fused_lm_head", None)
    if not callable(head):
        return "trl.trainer.utils.add_fused_lm_head (the fused log-prob head) is gone"
    if "outputs" not in inspect.signature(head).parameters:
        return "trl.trainer.utils.add_fused_lm_head takes no `outputs` (the per-token fields to compute)"
    output = getattr(utils, "FusedCausalLMOutput", None)
    fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    missing = [name for name in CONTRACT_OUTPUTS if name not in fields]
    if missing:
        return f"the fused head's output (trl.trainer.utils.FusedCausalLMOutput) has no {', '.join(missing)}"
    from trl import SFTTrainer

    try:
        source = inspect.getsource(SFTTrainer.compute_loss)
    except (OSError, TypeError):  # no source shipped: the trainer's first-step check still tells
        return None
    if "fused_lm_head=True" not in source or "-outputs.log_probs" not in source:
        return "SFTTrainer.compute_loss no longer trains -outputs.log_probs from the fused head (fused_lm_head=True)"
    return None


def check_trl_version() -> None:
    """Inside the tested TRL range, nothing to check. Outside it, TRL's contract (:func:`trl_contract_problem`): a
    release that keeps it runs (one warning), one that breaks it is refused in one line naming what broke.
    ``TRL_PROB_ALLOW_UNTESTED_TRL=1`` skips the check (an escape hatch)."""
    from importlib.metadata import version

    from packaging.version import Version

    found = version("trl")
    low, high = (Version(v) for v in TESTED_TRL)
    if low <= Version(found) < high or os.environ.get("TRL_PROB_ALLOW_UNTESTED_TRL") == "1":
        return
    problem = trl_contract_problem()
    if problem is not None:
        raise ImportError(
            f"trl-prob cannot run on trl {found}: {problem}. Install `pip install 'trl>={low},<{high}'` (tested), or "
            "set TRL_PROB_ALLOW_UNTESTED_TRL=1 to try anyway."
        )
    import warnings

    warnings.warn(
        f"trl-prob is tested with trl>={low},<{high}; found trl {found}, whose fused-head contract holds "
        "(trl_prob.trl_contract_problem): running.",
        stacklevel=2,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
