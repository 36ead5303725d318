"""The WebNLG benchmarks' data splits: the operator's base-prefix data never overlaps what
tenants uploaded or what is scored, and the extrapolation's unseen side is never trained on."""

from __future__ import annotations

from bench.tenants_webnlg import operator_slice
from bench.webnlg_data import Entry
from bench.webnlg_extrapolation import split_categories


def entry(category: str, triples: list[tuple[str, str, str]], *references: str) -> Entry:
    text = " ; ".join(" | ".join(t) for t in triples)
    return Entry(category, text, tuple(references), frozenset(triples))


def test_operator_slice_leaves_out_every_overlap_with_tenant_and_held_back_entries() -> None:
    dev = [
        entry("Airport", [("A", "city", "B")], "A is in B."),
        entry("Food", [("Pie", "country", "France")], "Pie is French."),
    ]
    held_back = [dev[1]]
    train = [
        entry("Airport", [("A", "city", "B")], "Another sentence."),  # same triple set
        entry("Airport", [("C", "city", "D")], "A is in B."),  # same reference
        entry("Food", [("Pie", "country", "France"), ("Pie", "dish", "x")], "y"),  # held triple
        entry("Airport", [("A", "city", "B"), ("A", "runway", "3")], "A has 3 runways."),
        entry("Food", [("Tart", "country", "Spain")], "Tart is Spanish."),
    ]
    chosen, removed = operator_slice(train, dev, held_back, per_category=10, seed=0)
    assert sorted(e.references[0] for e in chosen) == ["A has 3 runways.", "Tart is Spanish."]
    assert removed == {
        "same triple set as a dev entry": 1,
        "same reference as a dev entry": 1,
        "shares a triple with a held-back entry": 1,
    }


def test_operator_slice_takes_at_most_per_category_from_each_category() -> None:
    train = [entry(c, [(f"{c}{i}", "p", "o")], f"{c} {i}.") for c in "XY" for i in range(5)]
    chosen, _ = operator_slice(train, [], [], per_category=2, seed=1)
    assert sorted(e.category for e in chosen) == ["X", "X", "Y", "Y"]


def test_extrapolation_split_trains_on_seen_categories_only_and_holds_out_its_eval() -> None:
    categories = {
        name: [
            entry(name, [(f"{name}{i}", "p", "o")], f"{name} {i} a.", f"{name} {i} b.")
            for i in range(20)
        ]
        for name in ("A", "B", "C", "D")
    }
    split = split_categories(categories, ["A", "B"], n=10, eval_entries=5, seed=0)
    trained = {example.input for example in split.train + split.dev}
    assert {text[0] for text in trained} <= {"A", "B"}
    assert {m.mr[0] for m in split.seen} <= {"A", "B"}
    assert {m.mr[0] for m in split.unseen} <= {"C", "D"}
    assert not trained & {m.mr for m in split.seen}
    assert len(split.train) == 10 and len(split.seen) == len(split.unseen) == 5
