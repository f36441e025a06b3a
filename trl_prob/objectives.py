"""The per-token objectives of "Beyond Log Likelihood" (Li et al., 2025), as pure functions of log p.

Every objective is a per-token loss f(p) of the target-token probability p. Its gradient with respect
to the logits is w(p) times the ordinary cross-entropy gradient, with w(p) = -f'(p) * p, so the whole
family runs on a kernel that only returns the target log-probability (TRL's fused chunked LM head):
autograd through ``log_p`` is all it takes.

| spec            | paper repo key        | f(p)                         | w(p)              | normaliser  |
|-----------------|-----------------------|------------------------------|-------------------|-------------|
| ``nll``         | ``original``, ``logp``| -log p                       | 1                 | all tokens  |
| ``p``           | ``p``                 | 1 - p                        | p                 | all tokens  |
| ``power:a``     | ``GeneralFamily-a``   | (1 - p^a) / a                | p^a               | all tokens  |
| ``top_p:q``     | ``OnlyTopP-q``        | (1 - p) 1[p >= q]            | p 1[p >= q]       | kept tokens |
| ``bottom_p:q``  | ``OnlyBottomP-q``     | (1 - p) 1[p <= q]            | p 1[p <= q]       | kept tokens |
| ``top_logp:q``  | ``OnlyTopLogP-q``     | -log p 1[p >= q]             | 1[p >= q]         | kept tokens |
| ``bottom_logp:q``| ``OnlyBottomLogP-q`` | -log p 1[p <= q]             | 1[p <= q]         | kept tokens |
| ``dft``         | TRL ``loss_type=dft`` | -sg(p) log p                 | sg(p)             | all tokens  |

Normaliser: thresholded objectives average over the tokens they keep (the paper's code drops masked
tokens from the denominator); the others average over all target tokens, like TRL's ``nll``.
Thresholds compare the detached p.

Numerics: everything is computed in fp32 and in log space (p^a = exp(a log p)), so the loss is finite
for p -> 0 and p -> 1 and for large a.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

Normaliser = Literal["tokens", "kept_tokens"]

_FAMILIES = ("nll", "p", "power", "top_p", "bottom_p", "top_logp", "bottom_logp", "dft")
_THRESHOLDED = ("top_p", "bottom_p", "top_logp", "bottom_logp")
_PAPER_KEYS = {
    "original": "nll",
    "logp": "nll",
    "p": "p",
    "GeneralFamily": "power",
    "OnlyTopP": "top_p",
    "OnlyBottomP": "bottom_p",
    "OnlyTopLogP": "top_logp",
    "OnlyBottomLogP": "bottom_logp",
}

VALID_SPECS = (
    "nll, p, power:a (a > 0), top_p:q, bottom_p:q, top_logp:q, bottom_logp:q (q in [0, 1]), dft; "
    "paper-repo aliases: original, logp, GeneralFamily-a, OnlyTopP-q, OnlyBottomP-q, OnlyTopLogP-q, OnlyBottomLogP-q"
)


@dataclass(frozen=True)
class Objective:
    """A per-token objective f(p). Call it on target-token log-probabilities.

    Attributes:
        family: one of ``nll, p, power, top_p, bottom_p, top_logp, bottom_logp, dft``.
        param: the exponent ``a`` of ``power`` or the threshold ``q`` of the thresholded families.
        spec: the canonical spec string (``"power:10"``).
    """

    family: str
    param: float | None = None

    @property
    def spec(self) -> str:
        return self.family if self.param is None else f"{self.family}:{_format_number(self.param)}"

    @property
    def normaliser(self) -> Normaliser:
        """``"kept_tokens"`` for the thresholded families (mean over the tokens they keep), else ``"tokens"``."""
        return "kept_tokens" if self.family in _THRESHOLDED else "tokens"

    @property
    def is_thresholded(self) -> bool:
        return self.family in _THRESHOLDED

    @property
    def leans_on_prior(self) -> bool:
        """True when w(p) grows with p (the paper's prior-leaning objectives)."""
        return self.family in ("p", "power", "top_p", "top_logp", "dft")

    def keep(self, log_p: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the tokens this objective trains on (all True for non-thresholded families)."""
        if not self.is_thresholded:
            return torch.ones_like(log_p, dtype=torch.bool)
        # Compared in log space: exp(log q) can round below q in fp32, dropping a token sitting at p = q.
        log_q = math.log(self.param) if self.param > 0 else -math.inf
        log_p = log_p.detach().float()
        return log_p >= log_q if self.family.startswith("top") else log_p <= log_q

    def __call__(self, log_p: torch.Tensor) -> torch.Tensor:
        """Per-token loss f(p), fp32, same shape as ``log_p``, differentiable w.r.t. ``log_p``.

        Every f here is 0 at p = 1, so positions where TRL's fused head returns log p = 0 (ignored
        labels) contribute nothing; counting kept tokens still needs the caller's label mask.
        """
        log_p = log_p.float()
        family = self.family
        if family == "nll":
            return -log_p
        if family == "dft":
            return -log_p * log_p.detach().exp()
        if family == "p":
            return one_minus_exp(log_p)
        if family == "power":
            return power_loss(log_p, self.param)
        if family in ("top_p", "bottom_p"):
            return one_minus_exp(log_p) * self.keep(log_p)
        return -log_p * self.keep(log_p)  # top_logp, bottom_logp

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        """Gradient weight w(p) = -f'(p) p on the NLL gradient (the paper's table), for analysis and tests."""
        p = p.float()
        family = self.family
        if family == "nll":
            return torch.ones_like(p)
        if family in ("p", "dft"):
            return p.clone()
        if family == "power":
            return p.pow(self.param)
        keep = self.keep(p.log())
        base = p if family.endswith("_p") else torch.ones_like(p)
        return base * keep


def one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """1 - e^x with an accurate value (-expm1 x, no cancellation near x = 0) and an accurate gradient (-e^x).

    Autograd's expm1 backward computes (expm1(x) + 1), which rounds to 0 in fp32 once e^x < 6e-8: power:10 on
    a token with p = 0.06 would get no gradient at all.
    """
    e = torch.exp(x)
    return -torch.expm1(x).detach() - (e - e.detach())


def power_loss(log_p: torch.Tensor, a: float) -> torch.Tensor:
    """(1 - p^a) / a = (1 - e^(a log p)) / a; -log p at a = 0 (its limit)."""
    if a == 0:
        return -log_p
    return one_minus_exp(a * log_p) / a


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _parse_number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"Objective spec {spec!r}: {text!r} is not a number. Valid specs: {VALID_SPECS}.") from None
    if not math.isfinite(value):
        raise ValueError(f"Objective spec {spec!r}: the parameter must be finite. Valid specs: {VALID_SPECS}.")
    return value


def get_objective(spec: str | Objective) -> Objective:
    """Parse an objective spec (``"nll"``, ``"p"``, ``"power:10"``, ``"top_p:0.2"``, ``"OnlyTopP-0.2"``, ...).

    Raises ``ValueError`` naming the bad spec and listing the valid ones.
    """
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Objective spec must be a non-empty string, got {spec!r}. Valid specs: {VALID_SPECS}.")
    text = spec.strip()

    # The paper repo's keys: `original`, `logp`, `p`, `GeneralFamily-8`, `OnlyTopP-0.2`, ...
    paper = re.fullmatch(r"(GeneralFamily|OnlyTopP|OnlyBottomP|OnlyTopLogP|OnlyBottomLogP)-(.+)", text)
    if paper:
        family, param_text = _PAPER_KEYS[paper.group(1)], paper.group(2)
    elif text in ("original", "logp"):
        family, param_text = "nll", None
    else:
        family, _, param_text = text.partition(":")
        family = family.strip().lower()
        param_text = param_text.strip() or None

    if family not in _FAMILIES:
        raise ValueError(f"Unknown objective {spec!r}. Valid specs: {VALID_SPECS}.")
    needs_param = family == "power" or family in _THRESHOLDED
    if needs_param and param_text is None:
        raise ValueError(f"Objective {spec!r} needs a parameter, e.g. {family}:0.2. Valid specs: {VALID_SPECS}.")
    if not needs_param:
        if param_text is not None:
            raise ValueError(f"Objective {family!r} takes no parameter, got {spec!r}. Valid specs: {VALID_SPECS}.")
        return Objective(family)

    param = _parse_number(param_text, spec)
    if family == "power" and param <= 0:
        raise ValueError(
            f"Objective {spec!r}: the exponent a must be > 0 (a -> 0 is nll; use `nll`), got {param_text}."
        )
    if family in _THRESHOLDED and not 0.0 <= param <= 1.0:
        raise ValueError(f"Objective {spec!r}: the threshold q must be in [0, 1], got {param_text}.")
    return Objective(family, param)
