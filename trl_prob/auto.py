"""``--objective auto``: the configuration the evidence chose, resolved in one place (the CLI's first line and the
probe's recommendation both read :func:`describe`).

History. Until 2026-12-04 ``auto`` was the adaptive schedule toward DEFT, first by a rule on the 0.13M toy grid
(benchmarks/confidence.py). On the real model it failed where it matters first: the quickstart (SmolLM2-135M, LoRA,
MAWPS equations, 200 held-out problems, one seed, paired) went from 0.000 to 0.000 exact match under it (DEFT at lambda
1 learns the equation but not to stop: the model is confident in " =" where the label ends the answer, and DEFT
weights that token by p^a), against 0.425 for NLL and 0.435 for ``eaft:1``; and on the v1 real-model table ``eaft:1``
was first at both places measured. So ``auto`` is now the mission's schedule toward EAFT: NLL while the model is weak
on the task, EAFT (NLL weighted by the normalised entropy) once it is confident. This is provisional: the benchmark of
record (benchmarks/real_continuum.py, rule committed before its runs) decides, and ``auto`` becomes its winner.
"""

from __future__ import annotations

AUTO = "auto"
# What `auto` trains: the ProbSFTConfig fields it sets.
AUTO_SETTINGS: dict[str, object] = {
    "objective": "eaft:1",
    "objective_schedule": "adaptive",
    "schedule_signal": "token_top1",
}
# One line for the log at start and the probe: what `auto` is and where its evidence is.
AUTO_EVIDENCE = (
    "the adaptive schedule from NLL toward EAFT, chosen on the real model so far (SmolLM2 quickstart at 36 steps, "
    "200 held-out problems: exact match 0.000 -> 0.435 with eaft:1, 0.425 with NLL, 0.000 with the former DEFT-based auto); "
    "provisional until the real-model benchmark of record decides (benchmarks/README.md)"
)


def describe() -> str:
    """What ``auto`` trains and why, in one line: the CLI prints it before step 1 and the probe recommends it."""
    flags = " ".join(f"--{key} {value}" for key, value in AUTO_SETTINGS.items())
    return f"--objective auto (= {flags}): {AUTO_EVIDENCE}"


def resolve(config) -> None:
    """Replace ``objective="auto"`` on a config by :data:`AUTO_SETTINGS`. A field ``auto`` sets that the user also set
    to something else is one error line naming both (``auto`` chooses it)."""
    fields = config.__dataclass_fields__
    for key, value in AUTO_SETTINGS.items():
        if key == "objective":
            continue
        given, default = getattr(config, key), fields[key].default
        if given not in (default, value):
            raise ValueError(
                f"objective='auto' chooses {key}={value!r} itself; got {key}={given!r}. Drop {key}, or name the "
                "objective yourself instead of auto."
            )
        setattr(config, key, value)
    config.objective = AUTO_SETTINGS["objective"]
