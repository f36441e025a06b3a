"""The lab, behind one door: research schedules, signals and per-source schedules, kept beside the product.

``import trl_prob.experimental`` (``trl-prob sft --experimental``) registers the research rows into the core
registries (signals: median, share_confident, geomean, p25, sequence_top1_clean, token_top1_clean, confidence; schedule
kinds: cosine, token_gate, progress) and gives :class:`ExperimentalSFTConfig`, ``ProbSFTConfig`` plus their knobs
and per-source schedules (:mod:`trl_prob.experimental.sources`). The lab sits on top of the core: it imports the core,
never the other way round (tests/test_layers.py), and reaches a run only through the core's seams: the registries, a
schedule's ``token_lambdas``, the config's ``schedule_kwargs`` / ``flush_subnormals`` / ``run_extension``, and the
plug-in door :class:`trl_prob.extension.RunExtension` (per-source schedules: :class:`PerSourceExtension`). None of them
was shown to help on a real model (benchmarks/README.md).
"""

from __future__ import annotations

from .schedules import TOKEN_GATES, CosineSchedule, ProgressSchedule, TokenGateSchedule, register

register()

from .config import ExperimentalSFTConfig  # noqa: E402
from .sources import PerSourceExtension, SourceStats  # noqa: E402

__all__ = ["TOKEN_GATES", "CosineSchedule", "ExperimentalSFTConfig", "PerSourceExtension", "ProgressSchedule",
           "SourceStats", "TokenGateSchedule"]
