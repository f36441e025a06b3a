"""The per-token objectives: "Beyond Log Likelihood" (Li et al., 2025) and the confidence-aware ones after it.

Every objective is a per-token loss f(p) of the target-token probability p, some also gated by the model's own
(detached) confidence in that position: DEFT by sum_v p_v^2, EAFT by the entropy. Each family declares which of the
fused head's per-token outputs it reads (:data:`trl_prob.head.HEAD_OUTPUTS`); the trainer asks the head for them. Its gradient with respect to the
logits is w(p) times the ordinary cross-entropy gradient, with w(p) = -f'(p) p, so the whole family runs on a
kernel that only returns the target log-probability (TRL's fused chunked LM head): autograd through ``log_p`` is
all it takes.

Each family is one row of :data:`FAMILIES` (a :class:`Family`): its name, the paper repo's keys, f, w, which
tokens it keeps, its help text. Parsing, the CLI help, the README table (checked by a test) and the probe's
recommendation all read the registry, so a new family is one :func:`register_family` call.

Normaliser: thresholded families average over the tokens they keep (the paper's code drops masked tokens from
the denominator); the others over all target tokens, like TRL's ``nll``. Thresholds compare the detached p.

Numerics: fp32 and log space (p^a = exp(a log p)), so the loss is finite for p -> 0 and p -> 1 and large a.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .head import HEAD_OUTPUTS, HeadTokens, require

Normaliser = Literal["tokens", "kept_tokens"]
Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ the math


def one_minus_exp(x: Tensor) -> Tensor:
    """1 - e^x with an accurate value (-expm1 x, no cancellation near x = 0) and an accurate gradient (-e^x).

    Autograd's expm1 backward computes (expm1(x) + 1), which rounds to 0 in fp32 once e^x < 6e-8: power:10 on
    a token with p = 0.06 would get no gradient at all.
    """
    e = torch.exp(x)
    return -torch.expm1(x).detach() - (e - e.detach())


def power_loss(log_p: Tensor, a: float | Tensor) -> Tensor:
    """(1 - p^a) / a = (1 - e^(a log p)) / a; -log p at a = 0 (its limit). ``a`` may be a tensor (one per token)."""
    if isinstance(a, Tensor):
        at_zero = a == 0
        return torch.where(at_zero, -log_p, one_minus_exp(a * log_p) / torch.where(at_zero, 1.0, a))
    if a == 0:
        return -log_p
    return one_minus_exp(a * log_p) / a


def _log_threshold(q: float) -> float:
    # Compared in log space: exp(log q) can round below q in fp32, dropping a token sitting at p = q.
    return math.log(q) if q > 0 else -math.inf


def at_least(log_p: Tensor, q: float) -> Tensor:
    return log_p.detach() >= _log_threshold(q)


def at_most(log_p: Tensor, q: float) -> Tensor:
    return log_p.detach() <= _log_threshold(q)


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Family:
    """One objective family: everything the library, the CLI, the README and the probe need to know about it.

    Attributes:
        name: the spec's name (``power`` in ``power:10``).
        loss: f as a function of (log p in fp32, parameter or None), differentiable in log p.
        weight: w(p) = -f'(p) p as a function of (p, parameter or None), for analysis and tests.
        loss_text, weight_text: f and w as the README's table writes them.
        help: one line for the CLI help.
        paper_keys: the paper repo's names; for a family with a parameter, the key before ``-<param>``.
        reference_text: the README's "paper repo key" cell, when it is not the list of ``paper_keys``.
        param: the parameter's symbol (``a``, ``q``), ``None`` for a family without one.
        param_range: the allowed values of the parameter, as text; ``check_param`` enforces it.
        check_param: returns True for an allowed parameter value.
        keep: for thresholded families, which tokens train: (log p, parameter) -> bool tensor.
        leans_on_prior: w grows with p (the paper's prior-leaning objectives): what the probe recommends at the
            strong end of the continuum.
        reads: the fused head's per-token outputs it needs (:data:`~trl_prob.head.HEAD_OUTPUTS`). A family reading
            more than ``log_probs`` gets the micro-batch's :class:`~trl_prob.head.HeadTokens` as a third argument of
            ``loss`` and ``weight``.
    """

    name: str
    loss: Callable[[Tensor, float | None], Tensor]
    weight: Callable[[Tensor, float | None], Tensor]
    loss_text: str
    weight_text: str
    help: str
    paper_keys: tuple[str, ...] = ()
    reference_text: str | None = None
    param: str | None = None
    param_range: str | None = None
    check_param: Callable[[float], bool] | None = None
    keep: Callable[[Tensor, float], Tensor] | None = None
    leans_on_prior: bool = False
    reads: tuple[str, ...] = ("log_probs",)
    uses_tokens: bool = False  # needs the micro-batch's HeadTokens (e.g. its label mask) even if it reads only log p
    default_param: float | None = None  # the parameter of a bare ``name`` (``asft`` is ``asft:0.1``); None: required

    def __post_init__(self):
        unknown = set(self.reads) - set(HEAD_OUTPUTS)
        if unknown or "log_probs" not in self.reads:
            raise ValueError(
                f"Objective family {self.name!r}: reads={self.reads!r} must include 'log_probs' and name only "
                f"{', '.join(HEAD_OUTPUTS)}."
            )

    @property
    def takes_tokens(self) -> bool:
        return self.uses_tokens or tuple(self.reads) != ("log_probs",)

    @property
    def normaliser(self) -> Normaliser:
        return "kept_tokens" if self.keep is not None else "tokens"

    @property
    def spec_pattern(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param}"

    def readme_row(self) -> str:
        """This family's row of the README's objective table."""
        reference = self.reference_text or ", ".join(
            f"`{key}`" if self.param is None else f"`{key}-{self.param}`" for key in self.paper_keys
        )
        normaliser = "kept tokens" if self.keep is not None else "target tokens"
        return f"| `{self.spec_pattern}` | {reference} | {self.loss_text} | {self.weight_text} | {normaliser} |"


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry; its name and paper keys must not be taken by another family."""
    taken = set(FAMILIES) | {key for other in FAMILIES.values() for key in other.paper_keys}
    clash = sorted(({family.name} | set(family.paper_keys)) & taken)
    if clash:
        raise ValueError(f"Objective family {family.name!r}: {', '.join(clash)} already registered.")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    FAMILIES.pop(name)


def _unit_interval(q: float) -> bool:
    return 0.0 <= q <= 1.0


def _threshold_family(name: str, paper_key: str, direction: str, on_p: bool, leans_on_prior: bool) -> Family:
    keep = at_least if direction == "top" else at_most
    sign = ">=" if direction == "top" else "<="

    def loss(log_p: Tensor, q: float) -> Tensor:
        base = one_minus_exp(log_p) if on_p else -log_p
        return base * keep(log_p, q)

    def weight(p: Tensor, q: float) -> Tensor:
        return (p if on_p else torch.ones_like(p)) * keep(p.log(), q)

    kind = "1 - p" if on_p else "NLL"
    return Family(
        name=name,
        loss=loss,
        weight=weight,
        loss_text=f"{'(1 - p)' if on_p else '-log p'} 1[p {sign} q]",
        weight_text=f"{'p ' if on_p else ''}1[p {sign} q]",
        help=f"{kind} on the tokens with p {sign} q only",
        paper_keys=(paper_key,),
        param="q",
        param_range="q in [0, 1]",
        check_param=_unit_interval,
        keep=keep,
        leans_on_prior=leans_on_prior,
    )


for _family in (
    Family(
        name="nll",
        loss=lambda log_p, _: -log_p,
        weight=lambda p, _: torch.ones_like(p),
        loss_text="-log p",
        weight_text="1",
        help="negative log-likelihood (TRL's default)",
        paper_keys=("original", "logp"),
    ),
    Family(
        name="p",
        loss=lambda log_p, _: one_minus_exp(log_p),
        weight=lambda p, _: p.clone(),
        loss_text="1 - p",
        weight_text="p",
        help="-p: the paper's prior-leaning objective",
        paper_keys=("p",),
        leans_on_prior=True,
    ),
    Family(
        name="power",
        loss=power_loss,
        weight=lambda p, a: p.pow(a),
        loss_text="(1 - p^a) / a",
        weight_text="p^a",
        help="-p^a: NLL as a -> 0, -p at a = 1, more prior-leaning as a grows",
        paper_keys=("GeneralFamily",),
        param="a",
        param_range="a > 0",
        check_param=lambda a: a > 0,
        leans_on_prior=True,
    ),
    _threshold_family("top_p", "OnlyTopP", "top", on_p=True, leans_on_prior=True),
    _threshold_family("bottom_p", "OnlyBottomP", "bottom", on_p=True, leans_on_prior=False),
    _threshold_family("top_logp", "OnlyTopLogP", "top", on_p=False, leans_on_prior=True),
    _threshold_family("bottom_logp", "OnlyBottomLogP", "bottom", on_p=False, leans_on_prior=False),
    Family(
        name="dft",
        loss=lambda log_p, _: -log_p * log_p.detach().exp(),
        weight=lambda p, _: p.clone(),
        loss_text="-sg(p) log p",
        weight_text="sg(p)",
        help="dynamic fine-tuning (NLL weighted by the detached p)",
        reference_text='TRL `loss_type="dft"`',
    ),
):
    register_family(_family)


# ------------------------------------------------------------------------------- the confidence-aware families
# They gate each token by the model's own detached confidence in that position, read from the fused head (no full
# logits): DEFT (arXiv 2602.11424) by sum_v p_v^2, EAFT (arXiv 2601.02151) by the normalised entropy.

DEFT_EPS = 1e-6  # the DEFT code's (a + 1e-6); its Cayley variant uses 1e-8
CAYLEY_EPS = 1e-8


def gated_power_loss(log_p: Tensor, a: Tensor, eps: float) -> Tensor:
    """-(p^a - 1) / (a + eps) with a detached per-token exponent: DEFT's form for both of its gates."""
    return one_minus_exp(a * log_p) / (a + eps)


def gated_power_weight(p: Tensor, a: Tensor, eps: float) -> Tensor:
    return p.pow(a) * a / (a + eps)


def deft_loss(log_p: Tensor, _, tokens: HeadTokens) -> Tensor:
    # a = sg(sum_v p_v^2): NLL where the prediction is flat (a -> 1/V), -p where it is certain.
    return gated_power_loss(log_p, tokens.sum_sq_probs, DEFT_EPS)


def deft_weight(p: Tensor, _, tokens: HeadTokens) -> Tensor:
    return gated_power_weight(p, tokens.sum_sq_probs, DEFT_EPS)


def cayley_gate(log_p: Tensor, tokens: HeadTokens) -> Tensor:
    """DEFT's Cayley focus a = clamp(f + (1 - f) (1 - d) / (1 + d), 0.001, 1), d = 1 - p, f = 0.5 x the mean target p
    of the micro-batch (its target tokens on this process; with gradient accumulation, each micro-batch its own)."""
    p = log_p.detach().float().exp()
    mask = tokens.mask
    f = 0.5 * (p * mask).sum() / mask.sum().clamp(min=1)
    d = 1.0 - p
    return (f + (1.0 - f) * (1.0 - d) / (1.0 + d)).clamp(0.001, 1.0)


def deft_cayley_loss(log_p: Tensor, _, tokens: HeadTokens) -> Tensor:
    return gated_power_loss(log_p, cayley_gate(log_p, tokens), CAYLEY_EPS)


def deft_cayley_weight(p: Tensor, _, tokens: HeadTokens) -> Tensor:
    return gated_power_weight(p, cayley_gate(p.log(), tokens), CAYLEY_EPS)


def eaft_gate(tokens: HeadTokens, alpha: float) -> Tensor:
    # (H / ln V)^alpha, detached: full-vocabulary entropy from the head (LLaMA-Factory: top-20 entropy / ln 20).
    if tokens.vocab_size is None:
        raise ValueError("eaft normalises the entropy by ln V: HeadTokens.vocab_size is not set.")
    return tokens.normalised_entropy.pow(alpha)


for _family in (
    Family(
        name="deft",
        loss=deft_loss,
        weight=deft_weight,
        loss_text="(1 - p^a) / (a + 1e-6), a = sg(sum_v p_v^2)",
        weight_text="p^a a / (a + 1e-6)",
        help="DEFT: -p^a with a = the model's sum_v p_v^2 (NLL where unsure, -p where confident), no parameter",
        paper_keys=("DEFT",),
        reference_text="DEFT `DEFT`",
        leans_on_prior=True,
        reads=("log_probs", "log_sum_sq_probs"),
    ),
    Family(
        name="deft_cayley",
        loss=deft_cayley_loss,
        weight=deft_cayley_weight,
        loss_text="(1 - p^a) / (a + 1e-8), a = clip(f + (1 - f) p / (2 - p), 0.001, 1), f = mean p / 2",
        weight_text="p^a a / (a + 1e-8)",
        help="DEFT's Cayley variant: the exponent follows p and half the micro-batch's mean p",
        paper_keys=("Cayley_Trans",),
        reference_text="DEFT `Cayley_Trans`",
        leans_on_prior=True,
        uses_tokens=True,
    ),
    Family(
        name="eaft",
        loss=lambda log_p, alpha, tokens: -log_p * eaft_gate(tokens, alpha),
        weight=lambda p, alpha, tokens: eaft_gate(tokens, alpha),
        loss_text="-log p sg(H / ln V)^alpha",
        weight_text="(H / ln V)^alpha",
        help="EAFT: NLL weighted by the model's normalised entropy (confident tokens, confident conflicts, weigh less)",
        paper_keys=("EAFT",),
        reference_text="EAFT (`eaft_alpha`)",
        param="alpha",
        param_range="alpha > 0",
        check_param=lambda alpha: alpha > 0,
        reads=("log_probs", "entropy"),
    ),
):
    register_family(_family)


# ------------------------------------------------------------------------------- ASFT: anchored to a reference
# ASFT (arXiv 2509.23753): DFT plus alpha x KL(q_ref || p_model) over the vocabulary, per target token. The KL needs
# the model's and a reference's hidden states, which the fused head does not see: trl_prob/asft.py computes it in
# chunks through the LM head (LoRA: the model itself with its adapters disabled) and hands it in HeadTokens.ref_kl.

ASFT_DEFAULT_ALPHA = 0.1  # the authors' kl_weight and LLaMA-Factory's asft_alpha


def asft_loss(log_p: Tensor, alpha: float, tokens: HeadTokens) -> Tensor:
    if tokens.ref_kl is None:
        raise ValueError(
            f"objective 'asft:{_format_number(alpha)}' adds alpha x KL(reference || model) per token, which "
            "ProbSFTTrainer computes from the model's hidden states (trl_prob/asft.py); these head outputs carry none."
        )
    return -log_p * log_p.detach().exp() + alpha * tokens.ref_kl.float()


register_family(
    Family(
        name="asft",
        loss=asft_loss,
        weight=lambda p, _, tokens: p.clone(),  # the DFT part; the KL's logit gradient is alpha (p_v - q_v)
        loss_text="-sg(p) log p + alpha sum_v q_v log(q_v / p_v), q = the reference's next-token distribution",
        weight_text="sg(p), plus alpha (p_v - q_v) on the logits",
        help="ASFT: DFT anchored by alpha x KL(reference || model) over the vocabulary (alpha 0.1 by default; "
        "LoRA: the reference is the base with adapters disabled, full fine-tuning: --ref_model_name_or_path)",
        reference_text="ASFT `mode=asft` (`kl_weight`); LLaMA-Factory `use_asft_loss` (`asft_alpha`)",
        param="alpha",
        param_range="alpha >= 0",
        check_param=lambda alpha: alpha >= 0,
        uses_tokens=True,
        default_param=ASFT_DEFAULT_ALPHA,
    )
)


def valid_specs() -> str:
    """Every spec the registry accepts, for help texts and error messages."""
    specs = ", ".join(
        f.name if f.param is None else f"{f.spec_pattern} ({f.param_range})" for f in FAMILIES.values()
    )
    aliases = ", ".join(
        key if f.param is None else f"{key}-{f.param}" for f in FAMILIES.values() for key in f.paper_keys if key != f.name
    )
    return f"{specs}; paper-repo aliases: {aliases}"


def objective_help() -> str:
    """The ``--objective`` help: every family, one clause each."""
    return "Per-token objective (the target of the schedule): " + "; ".join(
        f"{f.spec_pattern}: {f.help}" for f in FAMILIES.values()
    ) + ". Paper-repo keys work too (" + ", ".join(
        key if f.param is None else f"{key}-{f.param}" for f in FAMILIES.values() for key in f.paper_keys if key != f.name
    ) + "). auto: the objective and schedule a benchmark's pre-written rule chose (trl_prob/auto.py)."


def readme_table() -> str:
    """The README's objective table, from the registry."""
    header = "| `--objective` | paper repo key | per-token loss f(p) | w(p) | normaliser |\n|---|---|---|---|---|"
    return "\n".join([header, *(f.readme_row() for f in FAMILIES.values())])


# ------------------------------------------------------------------------------------------------ an objective


@dataclass(frozen=True)
class Objective:
    """A per-token objective f(p): a family with its parameter. Call it on target-token log-probabilities.

    Attributes:
        family: the family's name (``power``).
        param: the exponent ``a`` of ``power`` or the threshold ``q`` of the thresholded families.
    """

    family: str
    param: float | None = None

    @property
    def row(self) -> Family:
        return FAMILIES[self.family]

    @property
    def spec(self) -> str:
        """The canonical spec (``"power:10"``)."""
        return self.family if self.param is None else f"{self.family}:{_format_number(self.param)}"

    @property
    def normaliser(self) -> Normaliser:
        """``"kept_tokens"`` for the thresholded families (mean over the tokens they keep), else ``"tokens"``."""
        return self.row.normaliser

    @property
    def is_thresholded(self) -> bool:
        return self.row.keep is not None

    @property
    def leans_on_prior(self) -> bool:
        """True when w(p) grows with p (the paper's prior-leaning objectives)."""
        return self.row.leans_on_prior

    def keep(self, log_p: Tensor) -> Tensor:
        """Boolean mask of the tokens this objective trains on (all True for non-thresholded families)."""
        if self.row.keep is None:
            return torch.ones_like(log_p, dtype=torch.bool)
        return self.row.keep(log_p.detach().float(), self.param)

    @property
    def reads(self) -> tuple[str, ...]:
        """The fused head's per-token outputs this objective reads."""
        return self.row.reads

    def _tokens(self, tokens: HeadTokens | None) -> HeadTokens:
        if tokens is None:
            raise ValueError(f"objective {self.spec!r} reads the micro-batch's head outputs: pass its HeadTokens.")
        require(tokens, {f"objective {self.spec!r}": self.reads})
        return tokens

    def __call__(self, log_p: Tensor, tokens: HeadTokens | None = None) -> Tensor:
        """Per-token loss f(p), fp32, same shape as ``log_p``, differentiable w.r.t. ``log_p``.

        Every f here is 0 at p = 1, so positions where TRL's fused head returns log p = 0 (ignored labels)
        contribute nothing; counting kept tokens still needs the caller's label mask. Families that read more than
        log p (:attr:`reads`) need ``tokens``, the micro-batch's other head outputs.
        """
        if self.row.takes_tokens:
            return self.row.loss(log_p.float(), self.param, self._tokens(tokens))
        return self.row.loss(log_p.float(), self.param)

    def weight(self, p: Tensor, tokens: HeadTokens | None = None) -> Tensor:
        """Gradient weight w(p) = -f'(p) p on the NLL gradient (the paper's table), for analysis and tests."""
        if self.row.takes_tokens:
            return self.row.weight(p.float(), self.param, self._tokens(tokens))
        return self.row.weight(p.float(), self.param)


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _family_of(text: str) -> tuple[Family, str | None] | None:
    """(family, parameter text) for a canonical spec (``power:10``) or a paper key (``GeneralFamily-10``)."""
    for family in FAMILIES.values():
        for key in family.paper_keys:
            if family.param is None and text == key:
                return family, None
            if family.param is not None and text.startswith(f"{key}-"):
                return family, text[len(key) + 1 :]
    name, _, param_text = text.partition(":")
    family = FAMILIES.get(name.strip().lower())
    return None if family is None else (family, param_text.strip() or None)


def get_objective(spec: str | Objective) -> Objective:
    """Parse an objective spec (``"nll"``, ``"p"``, ``"power:10"``, ``"top_p:0.2"``, ``"OnlyTopP-0.2"``, ...).

    Raises ``ValueError`` naming the bad spec and listing the valid ones.
    """
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Objective spec must be a non-empty string, got {spec!r}. Valid specs: {valid_specs()}.")
    found = _family_of(spec.strip())
    if found is None:
        raise ValueError(f"Unknown objective {spec!r}. Valid specs: {valid_specs()}.")
    family, param_text = found
    if family.param is None:
        if param_text is not None:
            raise ValueError(f"Objective {family.name!r} takes no parameter, got {spec!r}. Valid specs: {valid_specs()}.")
        return Objective(family.name)
    if param_text is None and family.default_param is not None:
        return Objective(family.name, float(family.default_param))
    if param_text is None:
        raise ValueError(
            f"Objective {spec!r} needs a parameter {family.param} ({family.param_range}), e.g. {family.name}:0.2."
        )
    try:
        param = float(param_text)
    except ValueError:
        raise ValueError(f"Objective spec {spec!r}: {param_text!r} is not a number. Valid specs: {valid_specs()}.") from None
    if not math.isfinite(param):
        raise ValueError(f"Objective spec {spec!r}: the parameter must be finite ({family.param_range}).")
    if not family.check_param(param):
        hint = " (a -> 0 is nll; use `nll`)" if family.name == "power" else ""
        raise ValueError(f"Objective {spec!r}: {family.param} must be {_range_words(family)}{hint}, got {param_text}.")
    return Objective(family.name, param)


def _range_words(family: Family) -> str:
    # "a > 0" -> "> 0"; "q in [0, 1]" -> "in [0, 1]": reads as "the threshold q must be in [0, 1]".
    return family.param_range.removeprefix(f"{family.param} ")


def __getattr__(name: str):
    if name == "VALID_SPECS":  # the registry can grow after import: computed when read
        return valid_specs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
