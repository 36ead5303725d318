"""The whole service end to end: WebNLG's 10 categories become 10 tenants.

Starts ``prefixd up`` (local Ray, the Serve app, the scheduler; SQLite and a blob directory
in a temporary PREFIXD_HOME; the embedded model), then, through the HTTP API only: creates
10 tenants, uploads each category's training entries, trains one prefix per tenant (the
scheduler runs the jobs), and generates every tenant's held-back entries with every
tenant's prefix. The result is a 10×10 BLEU matrix (rows: whose prefix; columns: whose
data): personalization works when the diagonal wins each column.

    .venv/bin/python -m bench.tenants_webnlg [--train-per-tenant 40] [--held-back 5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
import sacrebleu

from bench.local_service import local_service
from bench.report import write_section
from common.config import get_settings
from common.model_loading import ensure_embedded_model_dir
from services.api.routes.generate import MAX_INPUTS

WEBNLG = Path(__file__).resolve().parents[2] / "shared" / "data" / "webnlg" / "dev.json"
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "webnlg_tenants.png"
TITLE = "Tenants on WebNLG (bench/tenants_webnlg.py)"


def triples_text(entry: dict) -> str:
    return " ; ".join(
        f"{t['subject'].replace('_', ' ')} | {t['property']} | {t['object'].replace('_', ' ')}"
        for t in entry["modifiedtripleset"]
    )


def load_categories(path: Path) -> dict[str, list[tuple[str, list[str]]]]:
    data = json.loads(path.read_text())
    categories: dict[str, list[tuple[str, list[str]]]] = {}
    for wrapper in data["entries"]:
        (entry,) = wrapper.values()
        references = [lex["lex"] for lex in entry["lexicalisations"]]
        if references:
            categories.setdefault(entry["category"], []).append((triples_text(entry), references))
    return categories


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


def plot(matrix: list[list[float]], names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    image = axis.imshow(matrix, cmap="viridis")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("whose held-back data")
    axis.set_ylabel("whose prefix")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axis.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                color="white" if value < max(map(max, matrix)) * 0.6 else "black",
                fontsize=8,
            )
    figure.colorbar(image, label="BLEU")
    axis.set_title("WebNLG: 10 tenants × 10 prefixes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=WEBNLG)
    parser.add_argument("--train-per-tenant", type=int, default=40)
    parser.add_argument("--held-back", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    categories = load_categories(args.data)
    names = sorted(categories)[:10]
    rng = random.Random(args.seed)
    splits = {}
    for name in names:
        entries = categories[name][:]
        rng.shuffle(entries)
        held, train = entries[: args.held_back], entries[args.held_back :][: args.train_per_tenant]
        splits[name] = (train, held)

    model_dir = ensure_embedded_model_dir(get_settings())  # converted once, outside the run
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefixd-webnlg-") as home:
        service = local_service(Path(home), model_dir, env={"PREFIXD_TRAINER_SLOTS": "2"})
        with service as (url, token):
            api = httpx.Client(base_url=url, timeout=600)
            admin = {"Authorization": f"Bearer {token}"}
            keys, jobs = {}, {}
            for name in names:
                tenant = api.post("/v1/tenants", json={"name": name.lower()}, headers=admin).json()
                keys[name] = {"Authorization": f"Bearer {tenant['api_key']}"}
                train, _ = splits[name]
                body = "".join(
                    json.dumps({"input": x, "output": refs[0]}) + "\n" for x, refs in train
                )
                dataset = api.post(
                    "/v1/datasets",
                    content=body,
                    headers={**keys[name], "Content-Type": "application/jsonl"},
                )
                dataset.raise_for_status()
                hyper = {
                    "prefix_length": 10,
                    "epochs": args.epochs,
                    "learning_rate": 5e-4,
                    "batch_size": 8,
                }
                job = api.post(
                    "/v1/jobs",
                    json={"dataset_ids": [dataset.json()["id"]], "hyperparameters": hyper},
                    headers=keys[name],
                )
                job.raise_for_status()
                jobs[name] = job.json()["id"]
            pending = set(names)
            while pending:
                time.sleep(5)
                for name in sorted(pending):
                    state = api.get(f"/v1/jobs/{jobs[name]}", headers=keys[name]).json()
                    if state["status"] in ("succeeded", "failed", "cancelled"):
                        print(f"{name}: {state['status']} ({time.perf_counter() - started:.0f} s)")
                        if state["status"] != "succeeded":
                            raise RuntimeError(f"{name}: {state}")
                        pending.discard(name)
            trained = time.perf_counter() - started
            inputs = [x for name in names for x, _ in splits[name][1]]
            matrix = []
            for prefix_owner in names:
                outputs = generate(api, keys[prefix_owner], inputs, args.max_new_tokens)
                row = []
                for j, data_owner in enumerate(names):
                    held = splits[data_owner][1]
                    hypotheses = outputs[j * args.held_back : (j + 1) * args.held_back]
                    width = max(len(refs) for _, refs in held)
                    references = [
                        [refs[k] if k < len(refs) else refs[0] for _, refs in held]
                        for k in range(width)
                    ]
                    row.append(sacrebleu.corpus_bleu(hypotheses, references).score)
                matrix.append(row)
                print(prefix_owner, " ".join(f"{v:5.1f}" for v in row))
    wall = time.perf_counter() - started
    sizes = {name: len(splits[name][0]) for name in names}
    body = report(matrix, names, sizes, args, trained=trained, wall=wall)
    print(body)
    if not args.no_write:
        plot(matrix, names, IMG)
        print("wrote", write_section(TITLE, body))


def diagonal_ranks(matrix: list[list[float]]) -> list[int]:
    """Per column (whose data), the rank of the data owner's own prefix: 1 = best BLEU."""
    n = len(matrix)
    return [1 + sum(matrix[i][j] > matrix[j][j] for i in range(n)) for j in range(n)]


def report(
    matrix: list[list[float]],
    names: list[str],
    sizes: dict[str, int],
    args: argparse.Namespace,
    *,
    trained: float,
    wall: float,
) -> str:
    n = len(names)
    ranks = diagonal_ranks(matrix)
    diagonal = sum(matrix[i][i] for i in range(n)) / n
    off = sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    table = "| prefix \\ data | " + " | ".join(names) + " |\n|---|" + "---|" * n + "\n"
    table += "\n".join(
        f"| {names[i]} ({sizes[names[i]]}) | " + " | ".join(f"{v:.1f}" for v in matrix[i]) + " |"
        for i in range(n)
    )
    lost = ", ".join(
        f"{names[j]} (own {matrix[j][j]:.1f} vs {max(matrix[i][j] for i in range(n)):.1f})"
        for j in range(n)
        if ranks[j] > 1
    )
    return f"""The whole service on the embedded model (`prefixd up`: Ray, Serve, the scheduler with
2 trainer slots; SQLite and local blobs), driven only through the HTTP API. WebNLG 2017 dev:
each of {n} categories is a tenant that uploads up to {args.train_per_tenant} entries (first reference;
the number each had is in brackets) and trains a length-10 prefix for {args.epochs} epochs;
{args.held_back} entries per category are held back. Every tenant's prefix then generates every
tenant's held-back entries (greedy, batched requests of at most {MAX_INPUTS} inputs), scored
with sacrebleu against all references.

**The diagonal wins {sum(r == 1 for r in ranks)} of {n} columns**; the own prefix's mean rank in its column is
**{sum(ranks) / n:.1f} of {n}** (ranks {", ".join(map(str, ranks))}; {(n + 1) / 2:.1f} by chance). Mean BLEU on the
diagonal (own data) {diagonal:.1f} against {off:.1f} off the diagonal (another tenant's prefix).
Columns lost: {lost or "none"}. Training all {n} tenants took {trained:.0f} s, the whole run
{wall:.0f} s.

{table}

![10×10 BLEU heatmap](img/{IMG.name})

Reproduce: `.venv/bin/python -m bench.tenants_webnlg --train-per-tenant {args.train_per_tenant} --held-back {args.held_back} --epochs {args.epochs}`
"""


if __name__ == "__main__":
    main()
