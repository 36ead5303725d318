"""The whole service end to end: WebNLG's 10 categories become 10 tenants.

Starts ``prefixd up`` (local Ray, the Serve app, the scheduler; SQLite and a blob directory
in a temporary PREFIXD_HOME; the embedded model), then, through the HTTP API only: creates
10 tenants, uploads each category's training entries, trains one prefix per tenant (the
scheduler runs the jobs), and generates every tenant's held-back entries with every
tenant's prefix. The result is a 10×10 BLEU matrix (rows: whose prefix; columns: whose
data): personalization works when the diagonal wins each column.

With ``--base stack`` or ``--base warm_start`` (issue 20) the operator first trains a *base
prefix* through the admin API (``POST /v1/admin/datasets``, ``POST
/v1/admin/base-prefixes/jobs``) on a slice of WebNLG 2017 *train* (all categories) that no
tenant uploaded: entries whose triple set or any reference also occurs in dev, and entries
sharing any single triple with a held-back entry, are left out. Every tenant's job then
names that base. The base alone (decoded in this process from its blob, with the same
decoder the service uses) is an extra row: the diagonal should beat it by ``TARGET_RATIO``.
``--train-per-tenant 40 10`` runs both sizes on the same service and base (the 10 entries
are the first 10 of the 40), one matrix each.

    .venv/bin/python -m bench.tenants_webnlg --base stack --train-per-tenant 40 10 --held-back 8 --epochs 5
    .venv/bin/python -m bench.tenants_webnlg --base none --train-per-tenant 40 --held-back 8 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sacrebleu

from bench.local_service import local_service
from bench.report import write_section
from bench.webnlg_data import OPERATOR_DATA, WEBNLG, Entry, load_categories, load_entries
from common.blobstore import build_blob_store
from common.blobstore.keys import base_prefix_key
from common.config import Settings, get_settings
from common.generation import DecodingConfig, generate_texts
from common.model_loading import ensure_embedded_model_dir, load_model
from common.prefix_file import Prefix, prefix_from_bytes
from common.training_budget import (
    AUTOMATIC_EPOCHS,
    EVALUATIONS,
    MIN_STEPS,
    VALIDATION_FRACTION,
    VALIDATION_FROM,
)
from services.api.schemas.generation import MAX_INPUTS

IMG_DIR = Path(__file__).resolve().parent.parent / "docs" / "img"
IMG = IMG_DIR / "webnlg_tenants.png"  # the no-base table's heatmap
TITLE = "Tenants on WebNLG (bench/tenants_webnlg.py)"
TITLE_BASE = "Tenants on WebNLG with a base prefix (bench/tenants_webnlg.py, issue 20)"
TITLE_WARM = "Tenants on WebNLG warm-started from a base prefix (bench/tenants_webnlg.py, issue 20)"
BASE_ROW = "base alone"
TARGET_RATIO = 1.3  # issue 20: diagonal mean BLEU at least 1.3× the base prefix alone's
DECODE_CHUNK = 8  # inputs per in-process decoding call (the base-alone row)


def operator_slice(
    operator_entries: Sequence[Entry],
    tenant_entries: Sequence[Entry],
    held_back: Sequence[Entry],
    *,
    per_category: int,
    seed: int,
) -> tuple[list[Entry], dict[str, int]]:
    """The operator's base-prefix data: up to ``per_category`` entries of each category of
    ``operator_entries`` that no tenant could have uploaded and that say nothing about a
    held-back entry. Left out: an entry with the triple set or a reference of any entry in
    ``tenant_entries`` (all of dev), and one sharing even one triple with ``held_back``.
    Returns the slice and how many entries each rule removed."""
    triple_sets = {e.triples for e in tenant_entries}
    references = {r.strip() for e in tenant_entries for r in e.references}
    held_triples = {t for e in held_back for t in e.triples}
    removed = {"same triple set as a dev entry": 0, "same reference as a dev entry": 0}
    removed["shares a triple with a held-back entry"] = 0
    allowed: dict[str, list[Entry]] = {}
    for entry in operator_entries:
        if entry.triples in triple_sets:
            removed["same triple set as a dev entry"] += 1
        elif any(r.strip() in references for r in entry.references):
            removed["same reference as a dev entry"] += 1
        elif entry.triples & held_triples:
            removed["shares a triple with a held-back entry"] += 1
        else:
            allowed.setdefault(entry.category, []).append(entry)
    rng = random.Random(seed)
    chosen: list[Entry] = []
    for category in sorted(allowed):
        pool = allowed[category][:]
        rng.shuffle(pool)
        chosen += pool[:per_category]
    return chosen, removed


def jsonl(entries: Sequence[Entry]) -> str:
    """One training pair per entry: the triples and the first reference."""
    return "".join(
        json.dumps({"input": e.input, "output": e.references[0]}) + "\n" for e in entries
    )


def generate(
    api: httpx.Client, headers: dict[str, str], inputs: list[str], max_new_tokens: int
) -> list[str]:
    """All ``inputs`` with one tenant's prefix, in requests of at most MAX_INPUTS inputs."""
    outputs: list[str] = []
    for start in range(0, len(inputs), MAX_INPUTS):
        response = api.post(
            "/v1/generate",
            json={"inputs": inputs[start : start + MAX_INPUTS], "max_new_tokens": max_new_tokens},
            headers=headers,
        )
        if response.status_code != 200:
            raise RuntimeError(f"generate: HTTP {response.status_code}: {response.text}")
        outputs += response.json()["outputs"]
    return outputs


def bleu(hypotheses: Sequence[str], held: Sequence[Entry]) -> float:
    """Corpus BLEU against every reference of each entry."""
    width = max(len(e.references) for e in held)
    references = [
        [e.references[k] if k < len(e.references) else e.references[0] for e in held]
        for k in range(width)
    ]
    return float(sacrebleu.corpus_bleu(list(hypotheses), references).score)


def row_of(
    outputs: Sequence[str], names: Sequence[str], held: dict[str, list[Entry]]
) -> list[float]:
    """BLEU per data owner of one prefix's outputs (inputs in ``names`` order)."""
    row, start = [], 0
    for name in names:
        row.append(bleu(outputs[start : start + len(held[name])], held[name]))
        start += len(held[name])
    return row


def wait_for(api: httpx.Client, path: str, headers: dict[str, str], what: str) -> dict[str, Any]:
    """Poll a job until it ends; raise unless it succeeded."""
    started = time.perf_counter()
    while True:
        response = api.get(path, headers=headers)
        response.raise_for_status()
        state = response.json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            print(f"{what}: {state['status']} ({time.perf_counter() - started:.0f} s)", flush=True)
            if state["status"] != "succeeded":
                raise RuntimeError(f"{what}: {state}")
            return dict(state)
        time.sleep(5)


def plot(
    matrix: list[list[float]], rows: list[str], names: list[str], path: Path, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.0))
    image = axis.imshow(matrix, cmap="viridis")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    axis.set_xlabel("whose held-back data")
    axis.set_ylabel("whose prefix")
    top = max(map(max, matrix))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            color = "white" if value < top * 0.6 else "black"
            axis.text(j, i, f"{value:.0f}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, label="BLEU")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@dataclass
class Table:
    """One tenant size's outcome: the matrix (rows: prefixes, columns: data owners)."""

    size: int
    sizes: dict[str, int]
    matrix: list[list[float]]
    train_seconds: float
    decode_seconds: float
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (input, own, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=WEBNLG)
    parser.add_argument("--operator-data", type=Path, default=OPERATOR_DATA)
    parser.add_argument(
        "--base",
        choices=("none", "stack", "warm_start"),
        default="stack",
        help="how tenants use the operator's base prefix (none: no base, the earlier table)",
    )
    parser.add_argument("--base-per-category", type=int, default=10, help="operator entries")
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--train-per-tenant", type=int, nargs="+", default=[40])
    parser.add_argument("--held-back", type=int, default=8)
    parser.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="tenants' epochs; 0: none given, the service's automatic budget (what a tenant "
        "gets by default: common/training_budget.py)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.base == "none" and len(args.train_per_tenant) > 1:
        parser.error("--base none takes one --train-per-tenant (its section holds one table)")

    import torch

    torch.set_num_threads(args.threads)
    categories = load_categories(args.data)
    names = sorted(categories)[:10]
    rng = random.Random(args.seed)
    held: dict[str, list[Entry]] = {}
    pools: dict[str, list[Entry]] = {}
    for name in names:
        entries = categories[name][:]
        rng.shuffle(entries)
        held[name], pools[name] = entries[: args.held_back], entries[args.held_back :]
    held_all = [e for name in names for e in held[name]]
    operator: list[Entry] = []
    removed: dict[str, int] = {}
    if args.base != "none":
        operator, removed = operator_slice(
            load_entries(args.operator_data),
            [e for c in categories.values() for e in c],
            held_all,
            per_category=args.base_per_category,
            seed=args.seed,
        )
        print(f"operator data: {len(operator)} entries; left out: {removed}", flush=True)

    settings = get_settings()
    model_dir = ensure_embedded_model_dir(settings)  # converted once, outside the run
    started = time.perf_counter()
    tables: list[Table] = []
    base_info: dict[str, Any] = {}
    base_row: list[float] = []
    base_outputs: list[str] = []
    inputs = [e.input for e in held_all]
    with tempfile.TemporaryDirectory(prefix="prefixd-webnlg-") as home:
        service = local_service(Path(home), model_dir, env={"PREFIXD_TRAINER_SLOTS": "2"})
        with service as (url, token):
            api = httpx.Client(base_url=url, timeout=1200)
            admin = {"Authorization": f"Bearer {token}"}
            hyper: dict[str, Any] = {
                "prefix_length": 10,
                "learning_rate": 5e-4,
                "batch_size": 8,
            } | ({"epochs": args.epochs} if args.epochs else {})
            if args.base != "none":
                base_started = time.perf_counter()
                base_info = train_base(api, admin, operator, hyper | {"epochs": args.base_epochs})
                base_info["train_seconds"] = time.perf_counter() - base_started
                base = read_base(Path(home), base_info["id"])
                loaded = load_model(str(model_dir), settings=Settings(home=Path(home)))
                decode_started = time.perf_counter()
                base_outputs = decode_alone(loaded, base, inputs, args.max_new_tokens)
                del loaded
                base_row = row_of(base_outputs, names, held)
                base_info["decode_seconds"] = time.perf_counter() - decode_started
                print(BASE_ROW, " ".join(f"{v:5.1f}" for v in base_row), flush=True)
                hyper |= {"base_prefix": base_info["id"], "base_mode": args.base}
            for size in args.train_per_tenant:
                table = run_size(api, admin, names, pools, held, size, hyper, args)
                if base_outputs:
                    table.samples = [
                        (inputs[k], table.samples[k][1], base_outputs[k])
                        for k in range(0, len(inputs), args.held_back)
                    ][:3]
                tables.append(table)
                if not args.no_write:  # after every size: a cut run keeps what it finished
                    write(tables, names, base_row, base_info, removed, operator, args, started)
    print(f"whole run {time.perf_counter() - started:.0f} s")


def train_base(
    api: httpx.Client, admin: dict[str, str], operator: list[Entry], hyper: dict[str, Any]
) -> dict[str, Any]:
    """Upload the operator data and train the base prefix as an operator would (admin API)."""
    dataset = api.post(
        "/v1/admin/datasets",
        params={"name": "webnlg-train-slice"},
        content=jsonl(operator),
        headers={**admin, "Content-Type": "application/jsonl"},
    )
    dataset.raise_for_status()
    job = api.post(
        "/v1/admin/base-prefixes/jobs",
        json={"name": "webnlg", "dataset_ids": [dataset.json()["id"]], "hyperparameters": hyper},
        headers=admin,
    )
    job.raise_for_status()
    state = wait_for(api, f"/v1/admin/base-prefixes/jobs/{job.json()['id']}", admin, "base prefix")
    base_id = state["base_prefix_id"]
    listed = api.get(f"/v1/admin/base-prefixes/{base_id}", headers=admin)
    listed.raise_for_status()
    return {"id": base_id, "job": state, "base": listed.json()}


def read_base(home: Path, base_id: str) -> Prefix:
    """The base prefix's file from the service's blob store (no route serves a base alone)."""
    store = build_blob_store(Settings(home=home, blob_url=str(home / "blobs")))
    return prefix_from_bytes(store.get_bytes(base_prefix_key(base_id)), source="base prefix")


def decode_alone(loaded: Any, prefix: Prefix, inputs: list[str], max_new_tokens: int) -> list[str]:
    decoding = DecodingConfig(max_new_tokens=max_new_tokens)
    outputs: list[str] = []
    for start in range(0, len(inputs), DECODE_CHUNK):
        chunk = inputs[start : start + DECODE_CHUNK]
        outputs += generate_texts(loaded, [(prefix, x) for x in chunk], decoding)
    return outputs


def run_size(
    api: httpx.Client,
    admin: dict[str, str],
    names: list[str],
    pools: dict[str, list[Entry]],
    held: dict[str, list[Entry]],
    size: int,
    hyper: dict[str, Any],
    args: argparse.Namespace,
) -> Table:
    """Ten tenants with ``size`` entries each: upload, train (all queued at once), then
    every tenant's prefix on every tenant's held-back entries."""
    started = time.perf_counter()
    keys, jobs = {}, {}
    for name in names:
        created = api.post("/v1/tenants", json={"name": f"{name.lower()}-{size}"}, headers=admin)
        created.raise_for_status()
        keys[name] = {"Authorization": f"Bearer {created.json()['api_key']}"}
        dataset = api.post(
            "/v1/datasets",
            content=jsonl(pools[name][:size]),
            headers={**keys[name], "Content-Type": "application/jsonl"},
        )
        dataset.raise_for_status()
        job = api.post(
            "/v1/jobs",
            json={"dataset_ids": [dataset.json()["id"]], "hyperparameters": hyper},
            headers=keys[name],
        )
        job.raise_for_status()
        jobs[name] = job.json()["id"]
    for name in names:
        wait_for(api, f"/v1/jobs/{jobs[name]}", keys[name], f"{name} ({size} entries)")
    trained = time.perf_counter() - started
    inputs = [e.input for name in names for e in held[name]]
    matrix, own = [], []
    for index, prefix_owner in enumerate(names):
        outputs = generate(api, keys[prefix_owner], inputs, args.max_new_tokens)
        own += outputs[index * args.held_back : (index + 1) * args.held_back]
        matrix.append(row_of(outputs, names, held))
        print(prefix_owner, size, " ".join(f"{v:5.1f}" for v in matrix[-1]), flush=True)
    decoded = time.perf_counter() - started - trained
    table = Table(size, {n: len(pools[n][:size]) for n in names}, matrix, trained, decoded)
    table.samples = [(inputs[k], own[k], "") for k in range(len(own))]
    return table


def diagonal_ranks(matrix: list[list[float]]) -> list[int]:
    """Per column (whose data), the rank of the data owner's own prefix: 1 = best BLEU."""
    n = len(matrix)
    return [1 + sum(matrix[i][j] > matrix[j][j] for i in range(n)) for j in range(n)]


def markdown_table(matrix: list[list[float]], rows: list[str], names: list[str]) -> str:
    lines = ["| prefix \\ data | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, row in zip(rows, matrix, strict=True):
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def summary(table: Table, names: list[str], base_row: list[float]) -> dict[str, Any]:
    matrix, n = table.matrix, len(names)
    ranks = diagonal_ranks(matrix)
    diagonal = sum(matrix[i][i] for i in range(n)) / n
    off = sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    lost = [
        f"{names[j]} (own {matrix[j][j]:.1f} vs {max(matrix[i][j] for i in range(n)):.1f})"
        for j in range(n)
        if ranks[j] > 1
    ]
    out: dict[str, Any] = {"wins": sum(r == 1 for r in ranks), "ranks": ranks}
    out |= {"diagonal": diagonal, "off": off, "lost": lost}
    if base_row:
        base_mean = sum(base_row) / n
        out["base"] = base_mean
        out["ratio"] = diagonal / max(base_mean, 1e-9)
        out["beats_base"] = sum(matrix[j][j] > base_row[j] for j in range(n))
    return out


def image_path(args: argparse.Namespace, size: int) -> Path:
    """The heatmap of one table: seed 0 keeps its old file name, another seed gets its own."""
    if args.base == "none":
        return IMG
    seed = f"_seed{args.seed}" if args.seed else ""
    budget = "" if args.epochs else "_auto"
    return IMG_DIR / f"webnlg_tenants_{args.base}{budget}_{size}{seed}.png"


def write(
    tables: list[Table],
    names: list[str],
    base_row: list[float],
    base_info: dict[str, Any],
    removed: dict[str, int],
    operator: list[Entry],
    args: argparse.Namespace,
    started: float,
) -> None:
    for table in tables:
        rows = [f"{n} ({table.sizes[n]})" for n in names]
        matrix = table.matrix + ([base_row] if base_row else [])
        rows += [BASE_ROW] if base_row else []
        if args.base == "none":
            title = "WebNLG: 10 tenants × 10 prefixes"
        else:
            budget = f"{args.epochs} epochs" if args.epochs else "automatic budget"
            title = f"WebNLG tenants, {table.size} entries, {args.base} on a base, {budget}"
        plot(matrix, rows, names, image_path(args, table.size), title)
    body = report(tables, names, base_row, base_info, removed, operator, args, started)
    print(body)
    title = {"none": TITLE, "stack": TITLE_BASE, "warm_start": TITLE_WARM}[args.base]
    if not args.epochs:  # the automatic budget: a section of its own beside the fixed epochs'
        title = f"{title[:-1]}, automatic budget)"
    if args.seed:  # a section per seed: another seed's run adds to seed 0's, never replaces it
        title = f"{title[:-1]}, seed {args.seed})"
    print("wrote", write_section(title, body))


def report(
    tables: list[Table],
    names: list[str],
    base_row: list[float],
    base_info: dict[str, Any],
    removed: dict[str, int],
    operator: list[Entry],
    args: argparse.Namespace,
    started: float,
) -> str:
    n = len(names)
    command = shlex.join([".venv/bin/python", "-m", "bench.tenants_webnlg", *sys.argv[1:]])
    uses = {
        "none": "trains a length-10 prefix",
        "stack": "trains its own length-10 prefix **stacked** behind the frozen base prefix "
        "(served as base + own, 20 positions)",
        "warm_start": "trains a prefix **warm-started** from the base prefix (it stands alone)",
    }[args.base]
    budget = (
        f"{args.epochs} epochs"
        if args.epochs
        else f"no epochs given (the service's automatic budget: {AUTOMATIC_EPOCHS} epochs' worth, "
        f"at least {MIN_STEPS} optimizer steps; from {VALIDATION_FROM} entries a "
        f"{VALIDATION_FRACTION:.0%} validation split and the best of {EVALUATIONS} checks kept)"
    )
    parts = [
        f"""The whole service on the embedded model (`prefixd up`: Ray, Serve, the scheduler with
2 trainer slots; SQLite and local blobs), driven only through the HTTP API. WebNLG 2017 dev:
each of {n} categories is a tenant that uploads up to N entries (first reference; the number
each had is in brackets) and {uses}, {budget}, learning rate 5e-4, batch 8;
{args.held_back} entries per category are held back. Every tenant's prefix then generates every
tenant's held-back entries (greedy, at most {args.max_new_tokens} new tokens, batched requests of
at most {MAX_INPUTS} inputs), scored with sacrebleu against all references.""",
        f"Reproduce (this run, {time.strftime('%H:%M', time.gmtime())} UTC after "
        f"{time.perf_counter() - started:.0f} s):\n\n    {command}",
    ]
    if base_info:
        base = base_info["base"]
        left_out = "; ".join(f"{v} {k}" for k, v in removed.items())
        per_category = {c: sum(e.category == c for e in operator) for c in names}
        parts.append(
            f"""**The operator's base prefix.** Uploaded with `POST /v1/admin/datasets` and trained with
`POST /v1/admin/base-prefixes/jobs` (the same queue and trainers as tenants' jobs): {len(operator)}
entries of WebNLG 2017 *train*, up to {args.base_per_category} per category ({", ".join(f"{c} {k}" for c, k in per_category.items())}),
first reference each, length 10, {args.base_epochs} epochs, learning rate 5e-4, batch 8 (trained in
{base_info["train_seconds"]:.0f} s; base prefix `{base["name"]}` v{base["version"]}). No tenant
uploaded any of it: train entries were left out when they could overlap the tenants' data
({left_out}). Train and dev still share entities and single triples in general (WebNLG's
splits do); none of the base's entries shares a triple with a held-back entry. The row
**{BASE_ROW}** is the base prefix with no tenant part, decoded in the benchmark process from
its blob with the service's decoder (`common.generation.generate_texts`, greedy, same
{args.max_new_tokens} tokens)."""
        )
    for table in tables:
        s = summary(table, names, base_row)
        rows = [f"{names[i]} ({table.sizes[names[i]]})" for i in range(n)]
        matrix = table.matrix + ([base_row] if base_row else [])
        rows += [BASE_ROW] if base_row else []
        target = ""
        if base_row:
            met_wins = "met" if s["wins"] == n else "**missed**"
            met_ratio = "met" if s["ratio"] >= TARGET_RATIO else "**missed**"
            target = (
                f" Targets (issue 20): own prefix wins all {n} columns — {met_wins} "
                f"({s['wins']} of {n}); diagonal mean at least {TARGET_RATIO}× the base "
                f"alone — {met_ratio} ({s['diagonal']:.1f} vs {s['base']:.1f}, "
                f"**{s['ratio']:.2f}×**). The own prefix beats the base alone in "
                f"{s['beats_base']} of {n} columns."
            )
        image = image_path(args, table.size).name
        parts.append(
            f"""### {table.size} entries per tenant

**The diagonal wins {s["wins"]} of {n} columns**; the own prefix's mean rank in its column is
**{sum(s["ranks"]) / n:.1f} of {n}** (ranks {", ".join(map(str, s["ranks"]))}; {(n + 1) / 2:.1f} by chance). Mean BLEU on the
diagonal (own data) {s["diagonal"]:.1f} against {s["off"]:.1f} off the diagonal (another tenant's prefix).
Columns lost: {", ".join(s["lost"]) or "none"}.{target} Training all {n} tenants took
{table.train_seconds:.0f} s, generating the matrix {table.decode_seconds:.0f} s.

{markdown_table(matrix, rows, names)}

![{n}×{n} BLEU heatmap, {table.size} entries per tenant](img/{image})"""
        )
        samples = [x for x in table.samples if x[2]]
        if samples:
            parts.append(
                "Outputs (own prefix / base alone):\n\n"
                + "\n".join(f"- `{x}`\n  - own: {own}\n  - base: {b}" for x, own, b in samples)
            )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
