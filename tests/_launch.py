"""How the tests run ``trl-prob`` and other processes: every subprocess a test starts goes through :func:`run` (or
:func:`start`, for a test that must watch or kill it), under a timeout, so that a hung process (a rank stuck at exit)
fails its test instead of hanging the suite; offline, with the repository and tests/ importable.

- :func:`trl_prob` runs the console script ``trl-prob``, :func:`python` ``python ARGS`` (``-m MODULE``, a script),
  :func:`accelerate_launch` ``accelerate launch``, :func:`torchrun` ``torch.distributed.run``;
- :func:`ddp_train` runs ``tests/_ddp_train.py`` on one process or as a CPU (gloo) DDP launch;
- :func:`fail` runs ``trl-prob`` in this process and returns its one-line error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
BENCHMARKS = os.path.join(ROOT, "benchmarks")
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def environment(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """This process's environment, offline, ``OMP_NUM_THREADS=threads`` (None: as inherited), the repository, tests/
    and benchmarks/ on ``PYTHONPATH`` (as pyproject.toml's pytest ``pythonpath`` has them for the tests: the scripts in
    tests/ import conftest, which imports benchmarks/addition.py), and ``extra``."""
    env = {**os.environ, **BASE_ENV}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, TESTS, BENCHMARKS, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run(args, timeout: float, *, cwd: str | None = ROOT, threads: int | None = 1, env: dict | None = None,
        check: bool = False, fail_on_timeout: bool = True) -> subprocess.CompletedProcess | None:  # fmt: skip
    """``args`` as a subprocess (output captured as text) in :func:`environment` plus ``env``. Past ``timeout`` the
    test fails with the command and the end of its stderr, or (``fail_on_timeout=False``) None is returned.
    ``check``: a non-zero exit fails the test too."""
    args = [str(arg) for arg in args]
    try:
        result = subprocess.run(args, cwd=cwd, env=environment(threads, **(env or {})), capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        if not fail_on_timeout:
            return None
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(args[:4])} ... did not exit within {timeout}s:\n{stderr[-3000:]}")
    if check:
        assert result.returncode == 0, f"{' '.join(args[:4])} ... exit {result.returncode}:\n{result.stdout[-2000:]}\n" \
                                       f"{result.stderr[-5000:]}"  # fmt: skip
    return result


def start(args, *, cwd: str | None = ROOT, threads: int | None = 1, env: dict | None = None) -> subprocess.Popen:
    """``args`` started as :func:`run` would run it, with text pipes on stdout and stderr; the caller waits for it
    (``communicate(timeout=...)``) or kills it."""
    return subprocess.Popen([str(arg) for arg in args], cwd=cwd, env=environment(threads, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def trl_prob(*args, timeout: float, **kwargs):
    return run(["trl-prob", *args], timeout, **kwargs)


def python(*args, timeout: float, **kwargs):
    return run([sys.executable, *args], timeout, **kwargs)


def accelerate_launch(*args, timeout: float, **kwargs):
    return python("-m", "accelerate.commands.launch", *args, timeout=timeout, **kwargs)


def torchrun(*args, timeout: float, **kwargs):
    """``torch.distributed.run --master_port FREE ARGS``: torchrun's static rendezvous needs a real port (0 would hang
    the ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return python("-m", "torch.distributed.run", "--master_port", port, *args, timeout=timeout, **kwargs)


def ddp_train(out, objective, schedule, per_device_batch, num_processes, signal="mean", timeout: float = 180) -> dict:
    """tests/_ddp_train.py for 3 steps, on one process or as a ``num_processes``-rank CPU (gloo) DDP launch; its JSON."""
    script = [os.path.join(TESTS, "_ddp_train.py"), out, objective, schedule, per_device_batch, 3, signal]
    if num_processes == 1:
        python(*script, timeout=timeout, check=True)
    else:
        accelerate_launch("--multi_gpu", "--num_processes", num_processes, "--num_machines", 1, "--mixed_precision",
                          "no", "--dynamo_backend", "no", "--main_process_port", 0, *script, timeout=timeout,
                          env={"ACCELERATE_USE_CPU": "1"}, check=True)  # fmt: skip
    with open(out) as f:
        return json.load(f)


def fail(capsys, argv) -> tuple[int, str]:
    """Run `trl-prob ARGV` in this process; return (exit status, stderr), asserting the error is one clean line."""
    from trl_prob import cli

    status = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"trl-prob {argv[0]}: error: ")
    return status, err
