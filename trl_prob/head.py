"""What TRL's fused LM head gives per target token, as one small record: the seam between the head and the math.

TRL's ``add_fused_lm_head`` computes, tile by tile and without [tokens x vocab] logits, any of ``log_probs`` (always),
``is_top1``, ``entropy`` (full vocabulary, exact) and ``log_sum_sq_probs`` (log sum_v p_v^2, detached). Every
objective family (:mod:`trl_prob.objectives`) and every schedule signal (:mod:`trl_prob.schedules`) declares which of
them it reads; the trainer asks the head for their union and hands the pure loss and the statistics one
:class:`HeadTokens`. A quantity nobody reads is never computed, and one that is read but missing is refused by name
(:func:`require`), before the first optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch

# The per-token fields of TRL's `FusedCausalLMOutput` that trl-prob can read, in the order the head computes them.
HEAD_OUTPUTS = ("log_probs", "is_top1", "entropy", "log_sum_sq_probs")
# What SFTTrainer itself asks its head for (its metrics read entropy and is_top1).
TRL_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


class MissingHeadOutput(ValueError):
    """An objective or signal reads a per-token output that the model's forward did not return."""


@dataclass(frozen=True)
class HeadTokens:
    """Per-token outputs of one micro-batch, each ``[batch, seq]`` (0 on ignored positions), plus the label mask.

    Attributes:
        log_p: log-probability of each target token (differentiable: the loss trains through it).
        mask: True on target tokens.
        is_top1: whether the target is the model's most likely token (bool), or None.
        entropy: entropy of the next-token distribution in nats, or None (read detached).
        log_sum_sq_probs: log sum_v p_v^2, or None (detached in TRL).
        vocab_size: the model's vocabulary size V (for entropy / ln V), or None.
        ref_kl: KL(q_ref || p_model) over the vocabulary per target token (differentiable, fp32), or None: not a head
            output but the trainer's, for ASFT (:mod:`trl_prob.asft`).
    """

    log_p: torch.Tensor
    mask: torch.Tensor
    is_top1: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    vocab_size: int | None = None
    ref_kl: torch.Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs, vocab_size: int | None = None) -> HeadTokens:
        """The record of a ``FusedCausalLMOutput`` (an output the forward did not compute stays None)."""
        return cls(
            log_p=outputs.log_probs,
            mask=outputs.label_mask,
            is_top1=getattr(outputs, "is_top1", None),
            entropy=getattr(outputs, "entropy", None),
            log_sum_sq_probs=getattr(outputs, "log_sum_sq_probs", None),
            vocab_size=vocab_size,
            ref_kl=getattr(outputs, "ref_kl", None),  # set by trl_prob.asft's forward hook, for ASFT only
        )

    def get(self, name: str) -> torch.Tensor | None:
        """A field by its name in TRL's output (``log_probs`` is :attr:`log_p`)."""
        return self.log_p if name == "log_probs" else getattr(self, name)

    @property
    def returned(self) -> tuple[str, ...]:
        return tuple(name for name in HEAD_OUTPUTS if self.get(name) is not None)

    def with_log_p(self, log_p: torch.Tensor) -> HeadTokens:
        return replace(self, log_p=log_p)

    def rows(self, start: int, stop: int) -> HeadTokens:
        """Rows ``start:stop`` of every tensor (a slice of the batch)."""
        cut = {name: (None if self.get(name) is None else self.get(name)[start:stop]) for name in HEAD_OUTPUTS[1:]}
        ref_kl = None if self.ref_kl is None else self.ref_kl[start:stop]
        return replace(self, log_p=self.log_p[start:stop], mask=self.mask[start:stop], ref_kl=ref_kl, **cut)

    @property
    def sum_sq_probs(self) -> torch.Tensor | None:
        """sum_v p_v^2 (detached, fp32): the model's confidence, 1/V when flat, 1 when certain."""
        return None if self.log_sum_sq_probs is None else self.log_sum_sq_probs.detach().float().exp()

    @property
    def normalised_entropy(self) -> torch.Tensor | None:
        """H / ln V (detached, fp32, in [0, 1]): 1 when flat, 0 when certain."""
        if self.entropy is None or self.vocab_size is None:
            return None
        return (self.entropy.detach().float() / torch.log(torch.tensor(float(self.vocab_size)))).clamp(0.0, 1.0)


def union(reads: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """The head outputs that several readers' ``reads`` (objective families, signals) need together, in head order."""
    wanted = {"log_probs"}
    for names in reads:
        wanted.update(names)
    unknown = wanted - set(HEAD_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown head output(s) {', '.join(sorted(unknown))}; allowed: {', '.join(HEAD_OUTPUTS)}.")
    return tuple(name for name in HEAD_OUTPUTS if name in wanted)


def require(tokens: HeadTokens, needs: Mapping[str, Iterable[str]]) -> None:
    """Refuse a record that lacks an output some reader needs; ``needs`` maps a reader's description
    (``"objective 'deft'"``, ``"schedule_signal='token_top1'"``) to the outputs it reads. One line, naming both."""
    for who, names in needs.items():
        missing = [name for name in names if tokens.get(name) is None]
        if missing:
            raise MissingHeadOutput(
                f"{who} reads {', '.join(f'`{m}`' for m in missing)} from TRL's fused log-prob head, and this model's "
                f"forward did not return {'it' if len(missing) == 1 else 'them'} (it returned "
                f"{', '.join(tokens.returned)}). Use a model whose forward carries TRL's fused head "
                "(trl.trainer.utils.add_fused_lm_head), or an objective / signal read from p alone (e.g. "
                "--objective p, --schedule_signal mean)."
            )
