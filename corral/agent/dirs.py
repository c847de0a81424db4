"""Removing a directory whose usual contents are known (an attempt's directory, the
agent's or the job's), without a walk in the usual case."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def remove_known_dir(top: Path, files: Iterable[str] = (), subdirs: Iterable[str] = ()) -> None:
    """`top`, gone: the `files` unlinked and the (empty) `subdirs` removed by name,
    then `top` itself. Only when something else is inside (a temporary file of a write
    cut short, what a job left, a subdirectory it replaced by a link) does it take the
    walk of rmtree, which never follows a link. Called for every attempt: a walk costs
    a scan and a stat per entry."""
    path = str(top)
    try:
        for name in files:
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass
        for name in subdirs:
            try:
                os.rmdir(os.path.join(path, name))
            except FileNotFoundError:
                pass
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
