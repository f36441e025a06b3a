"""The lab, behind one door: research schedules, signals and per-source schedules, kept beside the product.

``import trl_prob.experimental`` (``trl-prob sft --experimental``) registers the research rows into the core
registries (signals: median, share_confident, geomean, p25, sequence_top1_clean, token_top1_clean, confidence; schedule
kinds: cosine, token_gate, progress) and gives :class:`ExperimentalSFTConfig`, ``ProbSFTConfig`` plus their knobs
and per-source schedules. The core reads them only through its seams (the schedule registry, a schedule's
``token_lambdas``); none of them was shown to help on a real model (benchmarks/README.md).
"""

from __future__ import annotations

from .schedules import TOKEN_GATES, CosineSchedule, ProgressSchedule, TokenGateSchedule, register

register()

from .config import ExperimentalSFTConfig  # noqa: E402

__all__ = ["TOKEN_GATES", "CosineSchedule", "ExperimentalSFTConfig", "ProgressSchedule", "TokenGateSchedule"]
