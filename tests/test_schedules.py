"""Schedules as pure functions against hand-computed values, and ProbSFTConfig's validation of the schedule fields.

No model, no training: every expected number below is worked out by hand in the test itself.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from trl_prob import ProbSFTConfig
from trl_prob.experimental import CosineSchedule, ExperimentalSFTConfig  # the research rows these tests also check
from trl_prob.schedules import (
    SIGNALS,
    MODES,
    SCHEDULES,
    AdaptiveSchedule,
    ConstantSchedule,
    NoSchedule,
    ScheduleStateError,
    WarmupSchedule,
    adaptive_lambda,
    build_schedule,
    ema_update,
    ramp,
    warmup_lambda,
)

NAN = float("nan")


# --------------------------------------------------------------------------------------------------------- ramp


@pytest.mark.parametrize(
    "x, expected",
    [(-5.0, 0.0), (-1e-12, 0.0), (0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0), (1.0 + 1e-12, 1.0), (7.0, 1.0)],
)
def test_ramp_clips_to_unit_interval(x, expected):
    assert ramp(x) == expected


# ------------------------------------------------------------------------------------------------------ warm-up


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # start
        (5, 0.5),  # mid: warm-up spans 0.1 * 100 = 10 steps
        (3, 0.3),
        (10, 1.0),  # end
        (11, 1.0),  # beyond
        (100, 1.0),
        (1000, 1.0),
    ],
)
def test_linear_warmup(step, expected):
    assert warmup_lambda(step, 100, 0.1, "linear") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (5, 0.5),  # 0.5 * (1 - cos(pi / 2)) = 0.5
        (10, 1.0),  # 0.5 * (1 - cos(pi)) = 1
        (20, 1.0),
        # a quarter of the way: 0.5 * (1 - cos(pi / 4)) = 0.5 - sqrt(2) / 4
        (2.5, 0.5 - math.sqrt(2) / 4),
    ],
)
def test_cosine_warmup(step, expected):
    assert warmup_lambda(step, 100, 0.1, "cosine") == pytest.approx(expected, abs=1e-12)


def test_cosine_warmup_is_below_linear_in_the_first_half_and_above_in_the_second():
    for step in range(1, 5):
        assert warmup_lambda(step, 100, 0.1, "cosine") < warmup_lambda(step, 100, 0.1, "linear")
    for step in range(6, 10):
        assert warmup_lambda(step, 100, 0.1, "cosine") > warmup_lambda(step, 100, 0.1, "linear")


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_with_no_warmup_steps_is_the_target_at_once(shape):
    assert warmup_lambda(0, 100, 0.0, shape) == 1.0
    assert warmup_lambda(0, 0, 0.5, shape) == 1.0


def test_warmup_ratio_one_spans_all_steps():
    assert [warmup_lambda(s, 4, 1.0) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_unknown_warmup_shape_is_named():
    with pytest.raises(ValueError, match="'exp'"):
        warmup_lambda(1, 10, 0.5, "exp")


# ----------------------------------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.0, 0.0),  # outside, below
        (0.10, 0.0),
        (0.30, 0.0),  # p_low
        (0.35, 0.2),  # (0.35 - 0.30) / 0.25
        (0.425, 0.5),  # midpoint
        (0.50, 0.8),
        (0.55, 1.0),  # p_high
        (0.77, 1.0),  # outside, above
        (1.0, 1.0),
    ],
)
def test_adaptive_lambda_default_band(p, expected):
    assert adaptive_lambda(p, 0.30, 0.55) == pytest.approx(expected, abs=1e-12)


def test_adaptive_lambda_other_band():
    assert adaptive_lambda(0.6, 0.5, 0.9) == pytest.approx(0.25)
    assert adaptive_lambda(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert adaptive_lambda(0.49, 0.5, 0.9) == 0.0
    assert adaptive_lambda(0.91, 0.5, 0.9) == 1.0


# ---------------------------------------------------------------------------------------------------------- EMA


def test_ema_first_value_is_taken_as_is():
    assert ema_update(None, 0.42, 0.9) == 0.42
    assert ema_update(NAN, 0.42, 0.9) == 0.42


def test_ema_nan_value_keeps_previous():
    assert ema_update(0.5, NAN, 0.9) == 0.5
    assert math.isnan(ema_update(None, NAN, 0.9))  # nothing seen yet: stays undefined


def test_ema_decay_math():
    assert ema_update(0.5, 1.0, 0.9) == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)  # 0.55
    assert ema_update(0.5, 1.0, 0.9) == pytest.approx(0.55)
    assert ema_update(0.2, 0.8, 0.0) == pytest.approx(0.8)  # decay 0: the last value
    assert ema_update(0.2, 0.8, 0.5) == pytest.approx(0.5)
    # three steps of decay 0.5 from 0 toward 1: 0.5, 0.75, 0.875
    value = 0.0
    for expected in (0.5, 0.75, 0.875):
        value = ema_update(value, 1.0, 0.5)
        assert value == pytest.approx(expected)


def test_ema_sequence_with_a_gap():
    # None -> 0.4 (first) -> NaN (step without tokens, kept) -> 0.8: 0.9 * 0.4 + 0.1 * 0.8 = 0.44
    value = None
    for v in (0.4, NAN, 0.8):
        value = ema_update(value, v, 0.9)
    assert value == pytest.approx(0.44)


# ----------------------------------------------------------------------------------------- Schedule objects


class Stats:
    """Stand-in for TokenProbStats: the statistic a step measured."""

    def __init__(self, mean_p: float):
        self.mean_p = self.median_p = self.share_confident = self.token_top1_share = self.sequence_top1_share = mean_p


def run(schedule, statistics, total_steps=None):
    """begin(), then step() through ``statistics``: the lambdas the steps 1, 2, ... trained with."""
    used = [schedule.begin(total_steps or len(statistics))]
    for value in statistics:
        used.append(schedule.step(Stats(value)))
    return used[:-1]


def test_none_is_the_target_alone():
    schedule = NoSchedule()
    assert schedule.value == 1.0  # before training too
    assert run(schedule, [0.01, 0.9, 0.3]) == [1.0, 1.0, 1.0]


def test_constant():
    assert run(ConstantSchedule(constant_lambda=0.3), [0.9] * 10) == [0.3] * 10
    assert run(ConstantSchedule(), [0.9] * 4) == [1.0] * 4  # default objective_lambda


@pytest.mark.parametrize("cls, shape", [(WarmupSchedule, "linear"), (CosineSchedule, "cosine")])
def test_warmup_matches_warmup_lambda(cls, shape):
    used = run(cls(warmup_ratio=0.5), [0.5] * 25, total_steps=20)
    assert used == [warmup_lambda(step, 20, 0.5, shape) for step in range(25)]
    # hand values: 10 warm-up steps, after 4 of them
    assert used[4] == pytest.approx(0.4 if shape == "linear" else 0.5 * (1 - math.cos(0.4 * math.pi)))


def test_adaptive_follows_the_ema_through_the_ramp():
    schedule = AdaptiveSchedule(ramp_low=0.2, ramp_high=0.6, ema_decay=0.0)  # decay 0: p_ema is the last statistic
    assert schedule.begin(10) == 0.0  # nothing measured yet: NLL
    for p, expected in [(NAN, 0.0), (0.1, 0.0), (0.3, 0.25), (0.4, 0.5), (0.9, 1.0)]:
        assert schedule.step(Stats(p)) == pytest.approx(expected), p
    defaults = AdaptiveSchedule()  # 0.30 -> 0.55
    defaults.warm_start(Stats(0.425))
    assert defaults.warm_started and defaults.begin(1) == pytest.approx(0.5)


def test_adaptive_ema_is_the_moving_average_of_the_statistic():
    schedule = AdaptiveSchedule(ramp_low=0.0, ramp_high=1.0, ema_decay=0.9)
    schedule.begin(3)
    # None -> 0.4 (first) -> NaN (kept) -> 0.8: 0.9 * 0.4 + 0.1 * 0.8 = 0.44, and lambda = p_ema on a 0 -> 1 ramp
    assert [schedule.step(Stats(p)) for p in (0.4, NAN, 0.8)] == pytest.approx([0.4, 0.4, 0.44])


def test_statistic_is_chosen_by_name():
    stats = Stats(0.0)
    stats.mean_p, stats.median_p, stats.share_confident = 0.1, 0.2, 0.3
    for name, value in (("mean", 0.1), ("median", 0.2), ("share_confident", 0.3)):
        assert AdaptiveSchedule(signal=name).signal(stats) == value


def test_monotone_never_decreases():
    trajectory = [0.25, 0.45, 0.35, 0.55, 0.2, 0.4, 0.65, 0.1]
    free = run(AdaptiveSchedule(ramp_low=0.2, ramp_high=0.6, ema_decay=0.0), trajectory)
    held = run(AdaptiveSchedule(ramp_low=0.2, ramp_high=0.6, ema_decay=0.0, monotone=True), trajectory)
    assert any(b < a for a, b in zip(free, free[1:]))  # the free one does decrease
    assert all(b >= a for a, b in zip(held, held[1:]))
    assert held == pytest.approx([max(free[: i + 1]) for i in range(len(free))])
    # a lost statistic (NaN) holds too
    schedule = AdaptiveSchedule(ramp_low=0.2, ramp_high=0.6, ema_decay=0.0, monotone=True)
    schedule.begin(3)
    assert schedule.step(Stats(0.44)) == pytest.approx(0.6)
    assert schedule.step(Stats(NAN)) == pytest.approx(0.6)


def test_monotone_constant_keeps_the_larger_restored_value():
    schedule = ConstantSchedule(constant_lambda=0.3, monotone=True)
    schedule.load_state_dict({"step": 2, "p_ema": None, "objective_lambda": 0.8, "warm_started": False})
    assert schedule.step(Stats(0.5)) == 0.8


def test_build_schedule_names_an_unknown_kind():
    class Args:
        objective_schedule, schedule_signal, schedule_ema_decay, schedule_monotone = "warmup", "mean", 0.9, False

    with pytest.raises(ValueError, match="'warmup'"):
        build_schedule(Args())


# ------------------------------------------------------------------------------------------------ state_dict


def test_state_dict_round_trip_through_json_continues_the_same_trajectory():
    trajectory = [0.3, 0.5, 0.45, 0.7, 0.6, 0.65]
    full = AdaptiveSchedule(ema_decay=0.5)
    full.warm_start(Stats(0.4))
    expected = run(full, trajectory)

    first = AdaptiveSchedule(ema_decay=0.5)
    first.warm_start(Stats(0.4))
    first.begin(len(trajectory))
    for p in trajectory[:3]:
        first.step(Stats(p))
    data = json.loads(json.dumps(first.state_dict()))
    assert set(data) == {"step", "p_ema", "objective_lambda", "warm_started"} and data["step"] == 3
    second = AdaptiveSchedule(ema_decay=0.5)
    second.load_state_dict(data)
    assert [second.value] + [second.step(Stats(p)) for p in trajectory[3:-1]] == pytest.approx(expected[3:])


@pytest.mark.parametrize(
    "state, message",
    [
        ([1, 2], "JSON object"),
        ({"p_ema": 0.5}, "missing step, objective_lambda"),
        ({"step": "4", "objective_lambda": 0.5}, "step must be an integer >= 0, got '4'"),
        ({"step": -1, "objective_lambda": 0.5}, "got -1"),
        ({"step": 4, "objective_lambda": 1.5}, "objective_lambda must be a number in [0, 1], got 1.5"),
        ({"step": 4, "objective_lambda": "high"}, "got 'high'"),
        ({"step": 4, "objective_lambda": 0.5, "p_ema": "x"}, "p_ema must be null or a number in [0, 1], got 'x'"),
        ({"step": 4, "objective_lambda": 0.5, "warm_started": "yes"}, "warm_started must be true or false"),
    ],
)
def test_load_state_dict_names_what_is_wrong(state, message):
    with pytest.raises(ScheduleStateError) as info:
        AdaptiveSchedule().load_state_dict(state)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------------- config


def config(tmp_path, **kwargs) -> ProbSFTConfig:
    return ExperimentalSFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **kwargs)


def raises_naming(value):
    """ValueError whose message contains ``value`` (the bad value) verbatim."""
    return pytest.raises(ValueError, match=re.escape(str(value)))


def test_valid_config_defaults(tmp_path):
    args = config(tmp_path)
    assert args.objective == "nll"
    assert args.objective_schedule == "none"
    assert args.schedule_mode == "blend"
    assert args.schedule_signal == "sequence_top1"  # what the model can do on the task (issue 34)
    assert args.schedule_ramp_low == 0.20 and args.schedule_ramp_high == 0.50  # that signal's own ramp
    assert args.schedule_ema_decay == 0.9
    assert args.schedule_warm_start_samples == 256
    assert not args.uses_objective
    assert set(SCHEDULES) == {"none", "constant", "linear", "cosine", "adaptive", "token_gate", "progress"}
    assert set(MODES) == {"blend", "exponent"}
    assert set(SIGNALS) == {"mean", "median", "share_confident", "geomean", "p25", "token_top1",
                            "sequence_top1", "sequence_top1_clean", "token_top1_clean", "confidence"}


@pytest.mark.parametrize(
    "field, value",
    [("objective_schedule", "warmup"), ("schedule_mode", "multiply"), ("schedule_signal", "mode")],
)
def test_unknown_choice_is_named(tmp_path, field, value):
    with raises_naming(value):
        config(tmp_path, objective="p", **{field: value})
    with pytest.raises(ValueError, match=field):
        config(tmp_path, objective="p", **{field: value})


@pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.6, 0.4)])
def test_p_low_must_be_below_p_high(tmp_path, low, high):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective="p", objective_schedule="adaptive", schedule_ramp_low=low, schedule_ramp_high=high)
    assert str(low) in str(info.value) and str(high) in str(info.value)


@pytest.mark.parametrize("field", ["schedule_constant_lambda", "schedule_warmup_ratio", "schedule_ramp_low", "schedule_ramp_high"])
@pytest.mark.parametrize("value", [-0.1, 1.5, NAN, float("inf")])
def test_unit_interval_fields(tmp_path, field, value):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective="p", objective_schedule="constant", **{field: value})
    message = str(info.value)
    assert field in message and repr(value) in message


@pytest.mark.parametrize("field, value", [("schedule_constant_lambda", 0.0), ("schedule_constant_lambda", 1.0),
                                          ("schedule_warmup_ratio", 0.0), ("schedule_warmup_ratio", 1.0)])
def test_unit_interval_ends_are_allowed(tmp_path, field, value):
    assert getattr(config(tmp_path, objective="p", objective_schedule="constant", **{field: value}), field) == value


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, NAN])
def test_ema_decay_outside_half_open_interval(tmp_path, decay):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective="p", objective_schedule="adaptive", schedule_ema_decay=decay)
    assert "schedule_ema_decay" in str(info.value) and repr(decay) in str(info.value)


def test_ema_decay_zero_is_allowed(tmp_path):
    assert config(tmp_path, objective="p", objective_schedule="adaptive", schedule_ema_decay=0.0).schedule_ema_decay == 0


@pytest.mark.parametrize("objective", ["p", "top_p:0.2", "dft"])
def test_exponent_mode_needs_a_power_target(tmp_path, objective):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective=objective, objective_schedule="linear", schedule_mode="exponent")
    assert objective in str(info.value) and "exponent" in str(info.value)


def test_exponent_mode_with_power_target_is_valid(tmp_path):
    args = config(tmp_path, objective="GeneralFamily-8", objective_schedule="linear", schedule_mode="exponent")
    assert args.objective == "power:8"


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "adaptive"])
@pytest.mark.parametrize("objective", ["nll", "original"])
def test_schedule_with_nll_target(tmp_path, schedule, objective):
    with raises_naming(repr(schedule)):
        config(tmp_path, objective=objective, objective_schedule=schedule)


def test_trl_dft_loss_with_non_nll_objective(tmp_path):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective="power:4", loss_type="dft")
    assert "dft" in str(info.value) and "power:4" in str(info.value)
    config(tmp_path, objective="nll", loss_type="dft")  # TRL's DFT alone is fine


def test_label_smoothing_with_non_nll_objective(tmp_path):
    with pytest.raises(ValueError) as info:
        config(tmp_path, objective="p", objective_schedule="adaptive", label_smoothing_factor=0.1)
    assert "label_smoothing_factor" in str(info.value) and "0.1" in str(info.value) and "'p'" in str(info.value)
    config(tmp_path, objective="nll", label_smoothing_factor=0.1)


@pytest.mark.parametrize(
    "schedule, expected", [("none", False), ("constant", False), ("linear", False), ("cosine", False), ("adaptive", True)]
)
def test_only_the_adaptive_schedule_warm_starts(tmp_path, schedule, expected):
    assert build_schedule(config(tmp_path, objective="p", objective_schedule=schedule)).warm_starts is expected


def test_warm_start_samples_zero_turns_it_off_and_negative_is_refused(tmp_path):
    assert config(tmp_path, objective="p", objective_schedule="adaptive",
                  schedule_warm_start_samples=0).schedule_warm_start_samples == 0  # fmt: skip
    with pytest.raises(ValueError, match=r"schedule_warm_start_samples must be an integer >= 0 .*got -1"):
        config(tmp_path, objective="p", objective_schedule="adaptive", schedule_warm_start_samples=-1)
