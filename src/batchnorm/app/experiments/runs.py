"""A run's output folder, checked before any training.

``--out`` must be a folder we can write to; a folder that holds an earlier run's checkpoint
is continued only with ``--resume`` and replaced only with ``--overwrite``; temporary files
left by a killed run (``kill -9`` between writing and renaming) are removed on start. The
run's settings are kept in ``run.json`` beside its checkpoints, so ``--resume DIR`` needs
nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*.npz")) if out.is_dir() else []


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove the ``*.tmp`` files an interrupted write left in ``out``; return them."""
    stale = sorted(p for p in out.glob("*.tmp") if p.is_file()) if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove we can write there; ValueError otherwise."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {out}: {exc.strerror or exc}"
                         ) from None


def prepare(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Everything about ``out`` that could fail after training, checked before it."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: give one")
    if resume:
        if not out.is_dir():
            raise FileNotFoundError(f"--resume {out}: no such folder")
    else:
        found = checkpoints(out)
        if found and not overwrite:
            raise ValueError(
                f"{out} holds a checkpoint of an earlier run ({found[0].name}): continue it "
                f"with --resume {out}, or start again with --overwrite")
        for p in found:
            p.unlink()
    check_writable(out)
    clean_stale_temporaries(out)


def save_settings(out: Path, settings: dict[str, Any]) -> None:
    """``run.json``: what ``--resume`` needs to start the same run again."""
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")
    tmp.replace(out / RUN_FILE)


def load_settings(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}): the run cannot be resumed") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): the run cannot be resumed")
    return settings


def refuse_conflicts(given: dict[str, Any], saved: dict[str, Any], what: str) -> None:
    """Options given with ``--resume`` must match the run's own (or be left out)."""
    for name, value in given.items():
        if value is None or name not in saved:
            continue
        old = saved[name]
        if isinstance(old, list):
            old = tuple(old)
        if value != old:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value!r} conflicts with the {what} being resumed "
                             f"({name}={old!r}): leave it out to continue that run, or "
                             "start a new one")
