"""``--objective auto``: the configuration the evidence chose, resolved in one place (the CLI's first line and the
probe's recommendation both read :func:`describe`).

History. Until 2026-12-04 ``auto`` was the adaptive schedule toward DEFT, chosen by a rule on the 0.13M toy grid
(benchmarks/confidence.py). On the real model it failed first in the quickstart (SmolLM2-135M, LoRA, MAWPS
equations: exact match 0.000 -> 0.000, against 0.425 for NLL and 0.435 for ``eaft:1``), so it became, provisionally,
the adaptive schedule toward ``eaft:1``. Since 2026-12-05 it is the winner of the benchmark of record
(benchmarks/real_continuum.py; rule committed before its runs; benchmarks/README.md): SmolLM2-135M-Instruct at five
places of the capability continuum, 12 candidates, paired per test problem, up to three seeds. ``eaft:1`` alone (EAFT:
NLL weighted by the normalised entropy of the model's next-token distribution) is first by that rule: the best fixed
objective at two places (``mid`` 0.458, ``strong`` 0.600), behind at three (``weak`` behind NLL, ``strong_noise25``
behind ``asft``, ``svamp`` behind ``deft_cayley``). No candidate was never behind, so ``auto`` is the one behind in
the fewest places (ties: the better mean rank; the schedule toward ``eaft:1`` ties on places and ranks second).
"""

from __future__ import annotations

AUTO = "auto"
# What `auto` trains: the ProbSFTConfig fields it sets. A fixed objective: `objective_schedule` is set too, so a
# schedule flag beside `auto` is refused (one line) rather than silently training something else.
AUTO_SETTINGS: dict[str, object] = {
    "objective": "eaft:1",
    "objective_schedule": "none",
}
# One line for the log at start and the probe: what `auto` is and where its evidence is.
AUTO_EVIDENCE = (
    "EAFT (NLL weighted by the normalised entropy), first by the committed rule of the real-model benchmark "
    "(evidence at one scale: SmolLM2-135M, LoRA, 36 steps per run, CPU; 5 places, 12 candidates, paired, up to 3 "
    "seeds): best at 2 places, behind at 3 (weak: NLL; noisy labels: asft; SVAMP: deft_cayley); no candidate was best "
    "everywhere; at the paper's scale (Qwen2.5-Math on NuminaMath) the paper's p (benchmarks/README.md)"
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
