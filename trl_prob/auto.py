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
    "objective_schedule": "adaptive",
    "schedule_signal": "token_top1",
}
# One line for the log at start and the probe: what `auto` is and where its evidence is.
AUTO_EVIDENCE = (
    "the adaptive schedule from NLL toward DEFT (-p^a, a = the model's own sum_v p_v^2 per token), following the "
    "share of target tokens the model ranks first: first by the pre-written rule over 11 rows of "
    "benchmarks/confidence.py, behind the best fixed objective in 3 rows (DEFT alone 4, the adaptive schedule toward "
    "-p 5). Caveats in benchmarks/README.md: on a weak base trained long it collapsed on 1 of 2 seeds (toy long row: "
    "0.126 / 0.890 against DEFT-Cayley's 0.850 / 0.858), and on SmolLM2 NLL and EAFT beat DEFT"
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
