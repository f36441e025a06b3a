"""``python -m trl_prob ...``: the ``trl-prob`` command (``python -m trl_prob.cli`` is the per-process entry)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
