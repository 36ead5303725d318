"""WebNLG extrapolation: train on 5 categories, evaluate on those and on 5 unseen ones.

The prefix-tuning paper's extrapolation claim (Li & Liang 2021: WebNLG unseen
categories, prefix-tuning 45.3 BLEU against fine-tuning 26.7) on the embedded model and
WebNLG 2017 dev. Per seed, :func:`common.datasets.e2e.low_data_split` (the protocol of
``bench/e2e_quality.py``) splits the entries of the ``--seen`` categories into
``--eval-entries`` held-out entries and N training pairs plus a dev slice of 30 % of N from
the other entries (every reference of an entry is a pair); ``--eval-entries`` entries of the
other categories, never trained on, are the unseen side. Every method trains on exactly the
same pairs with the same loop as ``bench/e2e_quality.py`` (its ``TRAINERS``,
``training_config``, best dev-loss epoch kept, learning rate per method) and decodes through
the same decoder; the score is multi-reference corpus BLEU on each side.

Finished runs accumulate in ``--results`` (JSON, one record per method and seed), so a cut
run keeps what it finished and a rerun skips them.

    .venv/bin/python -m bench.webnlg_extrapolation --n 200 --eval-entries 40 --epochs 5 --seeds 1 --threads 1
    .venv/bin/python -m bench.webnlg_extrapolation --quick     # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.e2e_quality import (
    TRAINERS,
    add_batching_argument,
    add_model_arguments,
    batching_signature,
    corpus_bleu,
    decode,
    encode,
    model_signature,
    placed,
    real_tokens,
    training_config,
    where_it_ran,
)
from bench.report import BENCHMARKS, write_section
from bench.run_records import append_record, load_records
from bench.webnlg_data import WEBNLG, Entry, load_categories
from common.config import Settings
from common.datasets.e2e import MeaningRepresentation, low_data_split
from common.generation import DecodingConfig
from common.model_loading import LoadedModel, load_model

TITLE = "WebNLG extrapolation to unseen categories (bench/webnlg_extrapolation.py)"
METHODS = ("prefix-random", "prefix-text", "peft-prefix", "finetune")
# Every other category in sorted order: seen and unseen both mix large and small categories.
SEEN = ("Airport", "Building", "ComicsCharacter", "Monument", "University")
RESULTS = Path("bench/out/webnlg_extrapolation.json")
PAPER = {"prefix": 45.3, "finetune": 26.7}  # Li & Liang 2021, WebNLG unseen categories, BLEU


@dataclass
class Run:
    """One method trained on one seed's split and evaluated on both sides."""

    seed: int
    method: str
    seen_bleu: float
    unseen_bleu: float
    best_epoch: int
    train_seconds: float
    decode_seconds: float
    tokens_per_second: float
    samples: list[tuple[str, str]] = field(default_factory=list)  # (unseen input, output)


@dataclass(frozen=True)
class Split:
    train: list
    dev: list
    seen: list[MeaningRepresentation]
    unseen: list[MeaningRepresentation]


def as_mrs(entries: Iterable[Entry]) -> list[MeaningRepresentation]:
    """WebNLG entries in the shape the E2E helpers score: input and every reference."""
    return [MeaningRepresentation(e.input, e.references) for e in entries]


def split_categories(
    categories: dict[str, list[Entry]], seen: Sequence[str], *, n: int, eval_entries: int, seed: int
) -> Split:
    unknown = sorted(set(seen) - set(categories))
    if unknown:
        raise SystemExit(f"--seen: no category {unknown} in the data (have {sorted(categories)})")
    seen_entries = [e for name in sorted(seen) for e in categories[name]]
    unseen_entries = [
        e for name in sorted(categories) if name not in seen for e in categories[name]
    ]
    low = low_data_split(as_mrs(seen_entries), n_train=n, n_test=eval_entries, seed=seed)
    unseen = as_mrs(unseen_entries)
    random.Random(seed).shuffle(unseen)
    if len(unseen) < eval_entries:
        raise SystemExit(f"the unseen categories have {len(unseen)} entries, {eval_entries} asked")
    return Split(low.train, low.dev, list(low.test), unseen[:eval_entries])


def run_one(loaded: LoadedModel, method: str, seed: int, split: Split, args) -> Run:
    init = "text:table-to-text:" if method == "prefix-text" else "random"
    config = training_config(args, seed, init=init)
    if method == "finetune":
        config.learning_rate = args.lr_finetune
    started = time.perf_counter()
    trained = TRAINERS[method](loaded, split.train, split.dev, config)
    train_seconds = time.perf_counter() - started
    tokens = real_tokens(encode(loaded, split.train, 0), config.epochs or 0)
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    started = time.perf_counter()
    seen_outputs = decode(trained, split.seen, decoding, args.decode_batch)
    unseen_outputs = decode(trained, split.unseen, decoding, args.decode_batch)
    decode_seconds = time.perf_counter() - started
    return Run(
        seed=seed,
        method=method,
        seen_bleu=corpus_bleu(seen_outputs, split.seen),
        unseen_bleu=corpus_bleu(unseen_outputs, split.unseen),
        best_epoch=trained.best_epoch,
        train_seconds=train_seconds,
        decode_seconds=decode_seconds,
        tokens_per_second=tokens / max(train_seconds, 1e-9),
        samples=[(m.mr, out) for m, out in zip(split.unseen[:2], unseen_outputs[:2], strict=True)],
    )


def mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{statistics.mean(values):.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(runs: Sequence[Run]) -> str:
    seeds = sorted({r.seed for r in runs})
    head = ["method", *(f"seen, seed {s}" for s in seeds), "seen mean"]
    head += [*(f"unseen, seed {s}" for s in seeds), "unseen mean", "unseen / seen"]
    head += ["best epoch", "train tokens/s", "wall s (train + decode)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        rows = {r.seed: r for r in runs if r.method == method}
        if not rows:
            continue
        seen = [r.seen_bleu for r in rows.values()]
        unseen = [r.unseen_bleu for r in rows.values()]
        cells = [method]
        cells += [f"{rows[s].seen_bleu:.1f}" if s in rows else "—" for s in seeds]
        cells.append(mean_std(seen))
        cells += [f"{rows[s].unseen_bleu:.1f}" if s in rows else "—" for s in seeds]
        cells.append(f"**{mean_std(unseen)}**")
        cells.append(f"{statistics.mean(unseen) / max(statistics.mean(seen), 1e-9):.2f}")
        cells.append(", ".join(str(rows[s].best_epoch) for s in seeds if s in rows))
        cells.append(f"{statistics.mean(r.tokens_per_second for r in rows.values()):.0f}")
        cells.append(
            f"{statistics.mean(r.train_seconds for r in rows.values()):.0f} + "
            f"{statistics.mean(r.decode_seconds for r in rows.values()):.0f}"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(runs: Sequence[Run]) -> str:
    """The paper's claim on our numbers: prefix-tuning ahead of fine-tuning on unseen
    categories (by how much, against the paper's +18.6)."""
    means = {
        m: (
            statistics.mean(r.seen_bleu for r in runs if r.method == m),
            statistics.mean(r.unseen_bleu for r in runs if r.method == m),
        )
        for m in METHODS
        if any(r.method == m for r in runs)
    }
    if "prefix-random" not in means or "finetune" not in means:
        return "Prefix vs fine-tuning: not both measured in this run."
    (p_seen, p_unseen), (f_seen, f_unseen) = means["prefix-random"], means["finetune"]
    gap = p_unseen - f_unseen
    holds = "holds" if gap > 0 else "does **not** hold"
    paper = PAPER["prefix"] - PAPER["finetune"]
    return (
        f"Unseen categories: prefix {p_unseen:.1f} vs fine-tuning {f_unseen:.1f} BLEU "
        f"({gap:+.1f}; the paper {PAPER['prefix']} vs {PAPER['finetune']}, {paper:+.1f}): the "
        f"paper's claim {holds} here. Seen categories: prefix {p_seen:.1f} vs fine-tuning "
        f"{f_seen:.1f} ({p_seen - f_seen:+.1f})."
    )


def section(runs: Sequence[Run], args: argparse.Namespace, split: Split) -> str:
    command = shlex.join([".venv/bin/python", "-m", "bench.webnlg_extrapolation", *sys.argv[1:]])
    unseen = sorted(set(load_categories(args.data)) - set(args.seen))
    protocol = (
        f"WebNLG 2017 dev (`{args.data.name}`). Seen categories (trained on): "
        f"{', '.join(sorted(args.seen))}; unseen (never trained on): {', '.join(unseen)}. Per "
        f"seed, `low_data_split` (the E2E protocol) holds out {args.eval_entries} seen entries, "
        f"samples N = {args.n} training pairs (triples → one reference; an entry's references "
        f"are separate pairs) and a dev slice of {len(split.dev)} pairs from the other seen "
        f"entries; {args.eval_entries} entries of the unseen categories are the unseen side. "
        f"Every method: the same pairs, {args.epochs} epochs, batch {args.batch_size}, AdamW, "
        f"linear warmup ({args.warmup_ratio:.0%}) then decay, clipping 1.0, token-mean loss on "
        "output tokens, the best dev-loss epoch kept (`bench/e2e_quality.py`'s loop and "
        f"trainers). Learning rate {args.lr_prefix:g} for the prefix rows (ours, "
        "`common/training.py`: length 10, 512-wide reparameterization), "
        f"{args.lr_finetune:g} for full fine-tuning (all weights). Decoding: "
        f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, at most "
        f"{args.max_new_tokens} new tokens; score: sacrebleu corpus BLEU against every "
        "reference of each entry."
    )
    samples = [
        f"- {r.method}, seed {r.seed}: `{r.samples[0][0]}` → {r.samples[0][1]}"
        for r in runs
        if r.samples
    ]
    parts = [
        f"Model: SmolLM2-135M-Instruct (`{args.model}`); " + where_it_ran(args),
        f"Reproduce (results accumulate in `{args.results}`; a rerun skips the runs it holds):"
        f"\n\n    {command}",
        protocol,
        table(runs),
        verdict(runs),
        "Unseen-category outputs:\n\n" + "\n".join(samples) if samples else "",
    ]
    return "\n\n".join(part for part in parts if part)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=WEBNLG)
    parser.add_argument("--seen", nargs="+", default=list(SEEN), help="the 5 trained categories")
    parser.add_argument("--n", type=int, default=200, help="training pairs")
    parser.add_argument("--eval-entries", type=int, default=40, help="entries per side")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 … S-1 (split and training)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=["prefix-random", "finetune"]
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy (the paper: 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_batching_argument(parser)
    add_model_arguments(parser)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--lr-prefix", type=float, default=5e-4)
    parser.add_argument("--lr-finetune", type=float, default=5e-5)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=BENCHMARKS)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (implies --no-write)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.n, args.eval_entries, args.seeds, args.epochs = 8, 3, 1, 1
        args.max_new_tokens, args.no_write = 16, True
        args.results = Path("bench/out/webnlg_extrapolation_quick.json")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def run_signature(args: argparse.Namespace) -> str:
    return (
        f"seen={sorted(args.seen)} n={args.n} eval={args.eval_entries} epochs={args.epochs} "
        f"beams={args.num_beams} max_new={args.max_new_tokens} batch={args.batch_size} "
        f"warmup={args.warmup_ratio} lr={args.lr_prefix}/{args.lr_finetune} model={args.model}"
        + batching_signature(args)
        + model_signature(args)
    )


def load_runs(path: Path, args: argparse.Namespace) -> list[Run]:
    return load_records(path, run_signature(args), _run_of)


def _run_of(record: dict[str, Any]) -> Run:
    return Run(**{**record, "samples": [tuple(s) for s in record["samples"]]})


def save_run(path: Path, run: Run, args: argparse.Namespace) -> None:
    append_record(path, asdict(run), run_signature(args))


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    categories = load_categories(args.data)
    splits = {
        seed: split_categories(
            categories, args.seen, n=args.n, eval_entries=args.eval_entries, seed=seed
        )
        for seed in range(args.seeds)
    }
    runs = load_runs(args.results, args)
    if not args.report_only:
        loaded = placed(load_model(args.model, settings=Settings()), args.device)
        done = {(r.seed, r.method) for r in runs}
        for seed, split in splits.items():
            for method in args.methods:
                if (seed, method) in done:
                    continue
                run = run_one(loaded, method, seed, split, args)
                runs.append(run)
                save_run(args.results, run, args)
                print(
                    f"seed {seed} {method:13s} seen {run.seen_bleu:5.1f} unseen "
                    f"{run.unseen_bleu:5.1f}  best epoch {run.best_epoch}  train "
                    f"{run.train_seconds:.0f} s decode {run.decode_seconds:.0f} s",
                    flush=True,
                )
                if not args.no_write:  # after every run: a cut run keeps what it did
                    write_section(TITLE, section(runs, args, splits[0]), args.out)
    if not runs:
        print("no finished runs")
        return
    print(table(runs))
    print(verdict(runs))
    if not args.no_write:
        print("wrote", write_section(TITLE, section(runs, args, splits[0]), args.out))


if __name__ == "__main__":
    main()
