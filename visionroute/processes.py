"""Whether a process on this host still runs: plain os, no MLflow or Prefect (the training engine uses it on
bare GPU machines)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while `pid` exists on this host (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
