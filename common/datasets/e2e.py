"""The E2E NLG Challenge data (restaurant meaning representations → text), the paper's
table-to-text benchmark.

Splits are made by *meaning representation* so an evaluation MR is never seen in
training, as in the paper's low-data protocol.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path

from common.data import Example
from common.errors import InvalidInputError

SHIPPED_DEV = Path(__file__).with_name("e2e_dev.txt.gz")


@dataclass(frozen=True)
class MeaningRepresentation:
    mr: str
    references: tuple[str, ...]


def read_e2e(path: str | Path = SHIPPED_DEV) -> list[MeaningRepresentation]:
    """Group ``MR||text`` lines by MR, in first-seen order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    grouped: dict[str, list[str]] = {}
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            mr, separator, text = line.partition("||")
            if not separator:
                raise InvalidInputError(f"{path}:{number}: expected 'MR||text'")
            grouped.setdefault(mr.strip(), []).append(text.strip())
    return [MeaningRepresentation(mr, tuple(refs)) for mr, refs in grouped.items()]


@dataclass(frozen=True)
class LowDataSplit:
    train: list[Example]
    dev: list[Example]
    test: list[MeaningRepresentation]


def low_data_split(
    mrs: list[MeaningRepresentation], *, n_train: int, n_test: int, seed: int
) -> LowDataSplit:
    """``n_test`` held-out MRs, then ``n_train`` training examples and a dev slice of 30% of
    ``n_train`` (for early stopping) sampled from the (MR, reference) pairs of the other
    MRs: no test MR is ever seen in training or dev."""
    n_dev = max(1, round(0.3 * n_train))
    rng = random.Random(seed)
    shuffled = mrs[:]
    rng.shuffle(shuffled)
    test, pool = shuffled[:n_test], shuffled[n_test:]
    pairs = [Example(m.mr, ref) for m in pool for ref in m.references]
    if n_train + n_dev > len(pairs) or not test:
        raise InvalidInputError(
            f"E2E has {len(pairs)} training pairs outside the {len(test)} test MRs; "
            f"{n_train} + {n_dev} requested"
        )
    rng.shuffle(pairs)
    return LowDataSplit(train=pairs[:n_train], dev=pairs[n_train : n_train + n_dev], test=test)
