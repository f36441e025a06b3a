"""The lab sits on top of the core: no core module imports ``trl_prob.experimental``.

Every core module (each ``trl_prob/*.py``) is imported in a fresh interpreter; ``trl_prob.experimental`` must still be
absent from ``sys.modules`` afterwards. The lab reaches a run only through the core's public seams
(``ProbSFTConfig.run_extension`` / ``schedule_kwargs`` / ``flush_subnormals``, :mod:`trl_prob.extension`, the
registries), so nothing in the core needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import trl_prob

PACKAGE = os.path.dirname(trl_prob.__file__)
CORE = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__main__.py")


def test_core_modules_are_found():
    assert {"trainer", "hook", "measure", "checkpoints", "probe", "preflight", "schedules", "config", "cli",
            "stats", "extension"} <= set(CORE)  # fmt: skip
    assert "sources" not in CORE  # per-source schedules live in the lab (trl_prob.experimental.sources)


def test_importing_every_core_module_leaves_the_lab_out():
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('trl_prob' if name == '__init__' else 'trl_prob.' + name)\n"
        "print(sorted(m for m in sys.modules if m == 'trl_prob.experimental' or m.startswith('trl_prob.experimental.')))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_lab_imports_the_core_and_plugs_in():
    """The other way round is the allowed one: the lab's config brings its per-source plug-in through the core's door."""
    from trl_prob.experimental import ExperimentalSFTConfig, PerSourceExtension
    from trl_prob.extension import RunExtension

    assert issubclass(PerSourceExtension, RunExtension)
    assert ExperimentalSFTConfig.run_extension is not trl_prob.ProbSFTConfig.run_extension
