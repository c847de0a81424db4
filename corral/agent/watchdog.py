"""Kills an agent build on trial that has not committed by its deadline.

    python -m corral.agent.watchdog TRIAL_FILE PID DEADLINE

A new agent build that hangs cannot roll itself back; this detached process kills
it so the supervisor starts the base command, which rolls the trial back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    trial_file, pid, deadline = argv[0], int(argv[1]), float(argv[2])
    while time.time() < deadline + 5:
        try:
            state = json.loads(Path(trial_file).read_text()).get("state")
        except (OSError, ValueError):
            return 0
        if state != "trial":
            return 0
        time.sleep(0.5)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
