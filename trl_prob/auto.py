"""``--objective auto``: the configuration a benchmark chose, resolved in one place.

The choice is made by the rule written in benchmarks/README.md ("Confidence-aware candidates and ``--objective
auto``") before the comparison ran: among the fixed objectives and the schedules, the candidate behind the best fixed
objective in the fewest rows of the grid, then ahead in the most, then of best mean rank; it replaces today's default
only if it is behind in fewer rows (or as many, and ahead in more). The settings below are that choice; the README
names it with its evidence.
"""

from __future__ import annotations

AUTO = "auto"
# What `auto` trains: the ProbSFTConfig fields it sets.
AUTO_SETTINGS: dict[str, object] = {
    "objective": "deft",
    "objective_schedule": "none",
}
# One line for the log at start and the probe: what `auto` is and where its evidence is.
AUTO_EVIDENCE = (
    "DEFT, -p^a with a = the model's own sum_v p_v^2 per token (NLL where it is unsure, -p where it is confident): "
    "first by the pre-written rule over 10 rows of benchmarks/confidence.py, behind the best fixed objective in 3 "
    "rows against 4 for the adaptive schedule toward -p (a provisional verdict: 2 seeds, long rows not yet run; "
    "benchmarks/README.md)"
)


def describe() -> str:
    flags = " ".join(f"--{key} {value}" for key, value in AUTO_SETTINGS.items())
    return f"objective auto = {flags}: {AUTO_EVIDENCE}"


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
