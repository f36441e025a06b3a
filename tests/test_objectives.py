"""Objectives as pure functions: values and gradient weights against the paper's formulas, parsing, errors."""

import math

import pytest
import torch

from _reference import paper_formula
from trl_prob import get_objective
from trl_prob.objectives import VALID_SPECS

P = torch.tensor([1e-30, 1e-8, 1e-3, 0.05, 0.2, 0.5, 0.55, 0.9, 1 - 1e-6, 1.0], dtype=torch.float64)


SPECS = ["nll", "p", "power:0.5", "power:10", "top_p:0.2", "bottom_p:0.2", "top_logp:0.2", "bottom_logp:0.55", "dft"]


@pytest.mark.parametrize("spec", SPECS)
def test_values_match_paper_formula(spec):
    objective = get_objective(spec)
    log_p = P.log().float()
    got = objective(log_p)
    assert got.dtype == torch.float32 and got.shape == log_p.shape
    assert torch.isfinite(got).all()
    want = paper_formula(spec, P)
    if spec == "dft":  # -sg(p) log p: the value is p * (-log p)
        want = want * P
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_weight_is_minus_df_dlogp(spec):
    """d f / d log p = f'(p) p = -w(p): the objective rescales the NLL gradient by w(p)."""
    objective = get_objective(spec)
    log_p = P[1:].log().float().requires_grad_(True)  # p = 1e-30 underflows fp32 p^a; checked for finiteness above
    objective(log_p).sum().backward()
    torch.testing.assert_close(-log_p.grad, objective.weight(log_p.detach().exp()), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(log_p.grad).all()


def test_power_limits():
    log_p = torch.linspace(-20, 0, 50)
    torch.testing.assert_close(get_objective("power:1")(log_p), get_objective("p")(log_p))
    # a -> 0 is NLL: (1 - p^a) / a -> -log p
    torch.testing.assert_close(get_objective("power:1e-7")(log_p), -log_p, rtol=1e-5, atol=1e-5)
    big = get_objective("power:100")(torch.tensor([-1e4, -1e-9]))
    assert torch.isfinite(big).all() and big[0].item() == pytest.approx(0.01)


def test_zero_on_ignored_positions():
    """TRL's fused head returns log p = 0 on ignored labels: every objective must give 0 there."""
    for spec in SPECS:
        assert get_objective(spec)(torch.zeros(3)).abs().max().item() == 0.0


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("original", "nll"),
        ("logp", "nll"),
        ("p", "p"),
        ("GeneralFamily-8", "power:8"),
        ("GeneralFamily-0.5", "power:0.5"),
        ("OnlyTopP-0.2", "top_p:0.2"),
        ("OnlyBottomP-0.8", "bottom_p:0.8"),
        ("OnlyTopLogP-0.2", "top_logp:0.2"),
        ("OnlyBottomLogP-0.2", "bottom_logp:0.2"),
        (" power:10 ", "power:10"),
        ("TOP_P:0.2", "top_p:0.2"),
    ],
)
def test_paper_aliases(alias, canonical):
    assert get_objective(alias) == get_objective(canonical)
    assert get_objective(alias).spec == canonical


def test_normaliser_rule():
    for spec in ("nll", "p", "power:3", "dft"):
        assert get_objective(spec).normaliser == "tokens"
    for spec in ("top_p:0.2", "bottom_p:0.2", "top_logp:0.2", "bottom_logp:0.2"):
        assert get_objective(spec).normaliser == "kept_tokens"


def test_keep_uses_threshold_inclusively():
    log_p = torch.tensor([0.1, 0.2, 0.3]).log()
    assert get_objective("top_p:0.2").keep(log_p).tolist() == [False, True, True]
    assert get_objective("bottom_p:0.2").keep(log_p).tolist() == [True, True, False]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cross_entropy", "Unknown objective 'cross_entropy'"),
        ("power", "needs a parameter"),
        ("power:0", "must be > 0"),
        ("power:-2", "must be > 0"),
        ("power:abc", "is not a number"),
        ("power:inf", "must be finite"),
        ("top_p:1.5", "must be in [0, 1]"),
        ("bottom_logp:-0.1", "must be in [0, 1]"),
        ("p:3", "takes no parameter"),
        ("", "non-empty"),
        ("OnlyTopP-x", "is not a number"),
    ],
)
def test_bad_specs_name_the_value_and_list_valid_ones(spec, message):
    with pytest.raises(ValueError) as err:
        get_objective(spec)
    assert message in str(err.value)
    if "Unknown" in message:
        assert VALID_SPECS in str(err.value)


def test_weight_orders_prior_leaning_vs_averse():
    p = torch.tensor([0.1, 0.9])
    for spec in ("p", "power:10", "top_p:0.05"):
        w = get_objective(spec).weight(p)
        assert w[1] > w[0], spec  # prior-leaning: trusts what the model believes
    w = get_objective("bottom_p:0.5").weight(p)
    assert w[0] > w[1]
    assert math.isclose(get_objective("nll").weight(p)[0].item(), 1.0)


def test_gradient_survives_tiny_p_to_the_a():
    """power:10 at p = 0.06: p^10 ~ 6e-13 is tiny but representable; its gradient must not round to 0."""
    log_p = torch.tensor([0.06, 1e-3]).log().requires_grad_(True)
    get_objective("power:10")(log_p).sum().backward()
    torch.testing.assert_close(-log_p.grad, torch.tensor([0.06, 1e-3]).pow(10), rtol=1e-5, atol=0)
