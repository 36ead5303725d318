"""Finished benchmark runs kept in a JSON file, so that a long quality benchmark resumes
where it stopped and several processes (one per method group) can share one file.

Each record carries the ``signature`` of the configuration that produced it (epochs, model,
learning rates, …); a run is reused only under the same signature, and records of other
configurations in the file are kept.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


def load_records(path: Path, signature: str, make: Callable[[dict[str, Any]], R]) -> list[R]:
    """The records of ``signature`` in ``path``, each built with ``make``."""
    if not path.exists():
        return []
    return [
        make(record)
        for record in json.loads(path.read_text())
        if record.pop("signature", None) == signature
    ]


def append_record(path: Path, record: dict[str, Any], signature: str) -> None:
    """Append under a file lock, replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.exists() else []
        records.append(record | {"signature": signature})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
