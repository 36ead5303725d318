"""Write one benchmark's section of docs/BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

Every figure here comes from one run of the command shown with it, comparing against a named
baseline in the same run; ratios matter, absolute numbers on a shared 2-core machine are
noise. Regenerate a section by rerunning its command.
"""


def machine() -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {threads} torch threads, {device}, torch {torch.__version__}"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the ``## title`` section of the benchmarks file."""
    text = path.read_text() if path.exists() else HEADER
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {title}\n\n_{stamp}; {machine()}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path
