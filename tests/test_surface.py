"""The product surface: what `trl-prob sft` adds to `trl sft`, and what `import trl_prob` registers, stay small; the
research rows live behind `import trl_prob.experimental` (`--experimental`) and are still reachable there."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

MAX_FLAGS = 15
CORE_SIGNALS = 3


def test_trl_prob_sft_adds_at_most_15_flags_to_trl_sft():
    from trl import SFTConfig

    from trl_prob.arguments import RunArguments
    from trl_prob.config import ProbSFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    ours = [f.name for f in dataclasses.fields(ProbSFTConfig) if f.name not in inherited]
    ours += [f.name for f in dataclasses.fields(RunArguments)]
    assert len(ours) <= MAX_FLAGS, ours
    # and the parser `trl-prob sft` builds offers exactly those on top of TRL's sft parser's
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_prob.cli import make_parser

    def flags(parser):
        return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}

    trl_sft = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    added = {flag for flag in flags(make_parser("sft")) - flags(trl_sft) if "-" not in flag[2:]}
    assert added == {f"--{name}" for name in ours}


def test_import_trl_prob_registers_few_signals_and_experimental_adds_the_rest():
    """In a fresh interpreter: the core registries, then the same after `import trl_prob.experimental`."""
    code = (
        "import trl_prob.schedules as s, trl_prob.config\n"
        "core = (sorted(s.SIGNALS), sorted(s.SCHEDULES))\n"
        "import trl_prob.experimental\n"
        "print((core, (sorted(s.SIGNALS), sorted(s.SCHEDULES))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    (core_signals, core_kinds), (all_signals, all_kinds) = eval(out.strip().splitlines()[-1])  # noqa: S307
    assert len(core_signals) <= CORE_SIGNALS and {"token_top1", "mean"} <= set(core_signals)
    assert set(core_kinds) == {"none", "constant", "linear", "adaptive"}
    assert set(all_signals) - set(core_signals) == {"median", "share_confident", "geomean", "p25", "sequence_top1_clean",
                                                    "token_top1_clean", "confidence"}  # fmt: skip
    assert set(all_kinds) - set(core_kinds) == {"cosine", "token_gate", "progress"}


def test_an_experimental_row_without_the_door_is_one_line_naming_it(tmp_path):
    from trl_prob.cli import parse
    from trl_prob.preflight import CLIError

    try:
        parse("sft", ["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--schedule_per_source", "true"])
    except CLIError as exc:
        assert "schedule_per_source" in str(exc)
    else:
        raise AssertionError("--schedule_per_source parsed without --experimental")
    args = parse("sft", ["--experimental", "--model_name_or_path", "x", "--output_dir", str(tmp_path),
                         "--objective", "p", "--objective_schedule", "token_gate", "--use_cpu", "true",
                         "--bf16", "false"])  # fmt: skip
    assert type(args[1]).__name__ == "ExperimentalSFTConfig" and args[1].schedule_token_gate == "sum_sq"
