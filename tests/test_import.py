"""``import trl_prob`` is light (TRL's own lazy-export pattern): torch, TRL and transformers load on first use."""

import pytest
from _launch import python

import trl_prob


def test_import_loads_no_heavy_module():
    code = "import sys, trl_prob; print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets') if m in sys.modules))"
    out = python("-c", code, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", trl_prob.__all__)
def test_every_export_resolves(name):
    assert getattr(trl_prob, name).__name__ == name
    assert name in dir(trl_prob)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        trl_prob.no_such_name  # noqa: B018


def test_untested_trl_is_checked_when_the_config_loads(monkeypatch):
    """Outside the tested range the contract decides (tests/test_trl_contract.py tests both branches); the escape
    hatch skips it."""
    monkeypatch.setattr(trl_prob, "TESTED_TRL", ("0.1.0", "0.2.0"))
    monkeypatch.delenv("TRL_PROB_ALLOW_UNTESTED_TRL", raising=False)
    monkeypatch.setattr(trl_prob, "trl_contract_problem", lambda: "the head is gone")
    with pytest.raises(ImportError, match=r"cannot run on trl .*: the head is gone\. .*trl>=0.1.0,<0.2.0"):
        trl_prob.check_trl_version()
    monkeypatch.setenv("TRL_PROB_ALLOW_UNTESTED_TRL", "1")
    trl_prob.check_trl_version()
