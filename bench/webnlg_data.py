"""WebNLG 2017 as the benchmarks read it (``../shared/data/webnlg``: ``dev.json`` for tenants
and evaluation, ``train.json`` for operator data): entries of linearized triples with every
reference. Kept apart from the service benchmark so the in-process benchmarks import no
service code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "webnlg"
WEBNLG = DATA / "dev.json"
OPERATOR_DATA = DATA / "train.json"


@dataclass(frozen=True)
class Entry:
    """One WebNLG entry: its category, the linearized triples and every reference."""

    category: str
    input: str
    references: tuple[str, ...]
    triples: frozenset[tuple[str, str, str]]


def triples_text(entry: dict) -> str:
    return " ; ".join(
        f"{t['subject'].replace('_', ' ')} | {t['property']} | {t['object'].replace('_', ' ')}"
        for t in entry["modifiedtripleset"]
    )


def load_entries(path: Path) -> list[Entry]:
    """Every entry with at least one reference, in file order."""
    data = json.loads(path.read_text())
    entries = []
    for wrapper in data["entries"]:
        (entry,) = wrapper.values()
        references = tuple(lex["lex"] for lex in entry["lexicalisations"])
        if references:
            triples = frozenset(
                (t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]
            )
            entries.append(Entry(entry["category"], triples_text(entry), references, triples))
    return entries


def load_categories(path: Path) -> dict[str, list[Entry]]:
    categories: dict[str, list[Entry]] = {}
    for entry in load_entries(path):
        categories.setdefault(entry.category, []).append(entry)
    return categories
