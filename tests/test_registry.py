"""The objective registry is the one place a family is defined: parsing, the CLI help, the README's table and the
probe's recommendation all read it. A new family is one ``register_family`` call."""

import os

import pytest
import torch

from trl_prob.objectives import (
    FAMILIES,
    Family,
    get_objective,
    objective_help,
    readme_table,
    register_family,
    unregister_family,
    valid_specs,
)
from trl_prob.probe import recommend

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def test_readme_objective_table_is_the_registry():
    assert readme_table() in readme_text()


def test_every_family_parses_from_its_name_and_paper_keys():
    for family in FAMILIES.values():
        spec = family.name if family.param is None else f"{family.name}:0.5"
        assert get_objective(spec).family == family.name
        for key in family.paper_keys:
            alias = key if family.param is None else f"{key}-0.5"
            assert get_objective(alias) == get_objective(spec)


@pytest.fixture
def cube_family():
    """A made-up family: f = (1 - p^3 a) / (3 a), added in one row."""
    row = register_family(
        Family(
            name="cube",
            loss=lambda log_p, a: (1 - torch.exp(3 * a * log_p)) / (3 * a),
            weight=lambda p, a: p.pow(3 * a),
            loss_text="(1 - p^(3a)) / (3a)",
            weight_text="p^(3a)",
            help="a test family",
            paper_keys=("Cube",),
            param="a",
            param_range="a > 0",
            check_param=lambda a: a > 0,
            leans_on_prior=True,
        )
    )
    yield row
    unregister_family("cube")


def test_a_new_family_is_one_row(cube_family):
    objective = get_objective("Cube-2")
    assert objective.spec == "cube:2" and objective.normaliser == "tokens" and not objective.is_thresholded
    log_p = torch.tensor([-0.5, -2.0])
    torch.testing.assert_close(objective(log_p), (1 - log_p.mul(6).exp()) / 6)
    with pytest.raises(ValueError, match=r"a must be > 0, got -1"):
        get_objective("cube:-1")
    assert "cube:a (a > 0)" in valid_specs() and "Cube-a" in valid_specs()
    assert "cube:a: a test family" in objective_help()
    # the README check sees the new row missing
    assert "| `cube:a` | `Cube-a` | (1 - p^(3a)) / (3a) | p^(3a) | target tokens |" in readme_table()
    assert readme_table() not in readme_text()
    # the probe recommends it at the strong end, as a prior-leaning target
    assert recommend(0.9, "cube:2")[0] == "cube:2"
    assert recommend(0.9, "bottom_p:0.2")[0] == "p"  # not prior-leaning: the probe falls back to p


def test_a_taken_name_or_key_is_refused(cube_family):
    with pytest.raises(ValueError, match="cube"):
        register_family(cube_family)
    clash = Family(name="other", loss=cube_family.loss, weight=cube_family.weight, loss_text="", weight_text="",
                   help="", paper_keys=("GeneralFamily",))
    with pytest.raises(ValueError, match="GeneralFamily already registered"):
        register_family(clash)


def test_a_new_family_reaches_the_command_line_help(cube_family, capsys):
    from trl_prob import cli

    sft_help = cli.make_parser("sft").format_help()
    assert "cube:a: a test family" in " ".join(sft_help.split())
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "cube:a: a test family" in " ".join(capsys.readouterr().out.split())
