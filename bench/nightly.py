"""Nightly retraining: one nightly run over many small tenants on one machine, per number
of trainer slots and of warm trainer processes.

Each configuration gets a fresh world — a SQLite database and a blob directory, as in the
single-machine mode — with the same tenants:

- ``--tenants`` tenants with new data: about 70% trained before (a "previous night"'s
  version, made from the frozen model's own key/values of a short text, published from a
  job with the benchmark's hyperparameters) that then received one new dataset, the rest
  never trained;
- ``--unchanged`` tenants trained before with no new data (the planner skips them).

The model is a **tiny random Llama built from a config** (tests/fixtures/models.py: 2 layers,
hidden 64, grouped-query attention; no download), so a job trains in about a second and the
figures measure the queue itself: planning, claiming, the trainer process (started for the
job with ``--warm 0``, the former behaviour; waiting, prepared, with ``--warm N``:
``PREFIXD_TRAINER_WARM_PROCESSES``), reading data, the quality gate's evaluation of both
versions, publishing. The scheduler is started first (its start is reported apart); wall
time runs from the planning pass's start to the last job's final state
(``nightly_runs.wall_seconds``). Then a second planning pass the same night must enqueue
nothing. A job's time runs from its claim to its publish (the job row's ``started_at`` and
``finished_at``); where it goes comes from the trainers' reports (``phases``), and what is
outside the trainer (claim to the trainer's start, the trainer's end to the row) is the rest.

Ray gets as many CPUs as the most slots plus the most warm processes measured: a warm process
holds a trainer's CPU while it waits.

    .venv/bin/python -m bench.nightly [--tenants 50] [--unchanged 10] [--slots 1 2] [--warm 0 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from bench.published_prefix import publish_prefix_as_trainer
from bench.report import write_section
from common.blobstore import dataset_key
from common.blobstore.base import sha256_hex
from common.blobstore.local import LocalBlobStore
from common.config import Settings
from common.db import crud
from common.db.engine import create_db_engine, session_scope, upgrade_database
from common.db.models import (
    TERMINAL_JOB_STATES,
    DatasetCreate,
    TenantCreate,
    TrainingJob,
)
from common.model_loading import LoadedModel, load_model
from common.prefix_file import Prefix
from common.prefix_init import text_key_values
from workers.nightly import run_nightly

PARAMS = {"prefix_length": 4, "mid_dim": 16, "epochs": 3, "batch_size": 4, "learning_rate": 0.01}
WORDS = "red green blue one two three four five six seven eight nine ten".split()
NIGHT = date(2031, 3, 14)
SECTION = "Nightly retraining (bench/nightly.py)"


def examples(n: int, seed: int) -> bytes:
    rows = [
        {
            "input": f"alpha {WORDS[(i * 7 + seed) % 13]} {WORDS[(i + seed) % 13]}",
            "output": " ".join(WORDS[(i + seed) % 5 : (i + seed) % 5 + 4]),
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def add_dataset(engine: Any, store: LocalBlobStore, tenant_id: uuid.UUID, data: bytes) -> None:
    dataset_id = uuid.uuid4()
    key = dataset_key(tenant_id, dataset_id)
    store.put_bytes(key, data)
    with session_scope(engine) as session:
        crud.add_dataset(
            session=session,
            tenant_id=tenant_id,
            dataset_in=DatasetCreate(
                id=dataset_id,
                object_key=key,
                sha256=sha256_hex(data),
                size_bytes=len(data),
                example_count=data.count(b"\n"),
            ),
        )


def previous_version(
    engine: Any, store: LocalBlobStore, loaded: LoadedModel, tenant_id: uuid.UUID, text: str
) -> None:
    """A version from an earlier night: a job over the tenant's datasets so far, and a
    prefix made from the model's own key/values of ``text`` (realistic magnitudes)."""
    key_values = text_key_values(loaded.model, loaded.tokenizer, text)[:, :, :, :4].contiguous()
    prefix = Prefix(key_values, loaded.fingerprint, loaded.architecture)
    with session_scope(engine) as session:
        datasets = crud.list_datasets(session=session, tenant_id=tenant_id)
    publish_prefix_as_trainer(
        engine=engine,
        blobs=store,
        tenant_id=tenant_id,
        prefix=prefix,
        dataset_ids=[d.id for d in datasets],
        hyperparameters=PARAMS,
    )


def build_world(
    root: Path,
    model_dir: Path,
    loaded: LoadedModel,
    args: argparse.Namespace,
    slots: int,
    warm: int,
) -> tuple[Settings, Any]:
    settings = Settings(
        home=root / "home",
        model=str(model_dir),
        database_url=f"sqlite:///{root / 'prefixd.sqlite3'}",
        blob_url=str(root / "blobs"),
        scheduler_namespace=f"prefixd-bench-{uuid.uuid4().hex[:8]}",
        trainer_slots=slots,
        trainer_warm_processes=warm,
        trainer_num_cpus=1,
        scheduler_poll_seconds=0.25,
        progress_event_seconds=5.0,
    )
    engine = create_db_engine(settings)
    upgrade_database(engine)
    store = LocalBlobStore(root / "blobs")
    rng = random.Random(0)
    words = "alpha beta gamma delta red green blue one two three".split()
    for i in range(args.tenants + args.unchanged):
        with session_scope(engine) as session:
            tenant = crud.create_tenant(session=session, tenant_in=TenantCreate(name=f"t{i:03d}"))
            tenant_id = tenant.id
        add_dataset(engine, store, tenant_id, examples(args.examples, seed=i))
        trained_before = i >= args.tenants or rng.random() < 0.7
        if trained_before:
            text = " ".join(rng.choice(words) for _ in range(4))
            previous_version(engine, store, loaded, tenant_id, text)
            if i < args.tenants:  # new data since
                add_dataset(engine, store, tenant_id, examples(args.examples // 2, seed=100 + i))
    return settings, engine


def night_jobs(engine: Any) -> list[TrainingJob]:
    with session_scope(engine) as session:
        key = crud.nightly_idempotency_key(NIGHT)
        stmt = select(TrainingJob).where(col(TrainingJob.idempotency_key) == key)
        jobs = list(session.exec(stmt).all())
        for job in jobs:
            session.expunge(job)
    return jobs


PHASES = ("prepare", "lease", "read", "train", "evaluate", "gate", "publish")


class TreeCpu:
    """CPU seconds of this process and all its descendants (the local Ray: its raylet, the
    scheduler actor, every trainer process) between ``start`` and ``stop``: each process's
    user + system time, sampled every ``every`` seconds from a thread, so a process that
    ends between two samples loses at most its last ``every`` seconds."""

    def __init__(self, every: float = 0.5) -> None:
        import psutil

        self._root = psutil.Process()
        self._every = every
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-cpu", daemon=True)
        self._baseline = True

    def _sample(self) -> None:
        import psutil

        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                key = (process.pid, process.create_time())
                times = process.cpu_times()
            except psutil.Error:  # ended meanwhile
                continue
            seconds = times.user + times.system
            if self._baseline:
                self._first[key] = seconds
            self._last[key] = seconds

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._baseline = False
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        spent = sum(last - self._first.get(key, 0.0) for key, last in self._last.items())
        new = sum(key not in self._first for key in self._last)
        return {"cpu_seconds": spent, "processes_started": new}


def measure(
    root: Path,
    model_dir: Path,
    loaded: LoadedModel,
    args: argparse.Namespace,
    slots: int,
    warm: int,
) -> dict[str, Any]:
    from workers.scheduler import (
        scheduler_status,
        start_scheduler,
        stop_scheduler,
        wait_until_ready,
    )

    settings, engine = build_world(root, model_dir, loaded, args, slots, warm)
    started = time.monotonic()
    handle, _ = start_scheduler(settings)
    wait_until_ready(handle, timeout=600)
    scheduler_start = time.monotonic() - started
    cpu = TreeCpu()
    cpu.start()
    try:
        outcome = run_nightly(engine, run_date=NIGHT, validation_split=0.1, defaults=PARAMS)
        planned = len(outcome.plan.tenants)
        deadline = time.monotonic() + args.timeout
        while True:
            jobs = night_jobs(engine)
            if sum(j.state in TERMINAL_JOB_STATES for j in jobs) == planned:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the night did not finish within {args.timeout} s")
            time.sleep(0.5)
        night_cpu = cpu.stop()
        rerun = run_nightly(engine, run_date=NIGHT, validation_split=0.1, defaults=PARAMS)
        # The scheduler collects a finished trainer's report within a round or two.
        ids = {str(j.id) for j in jobs}
        while True:
            status = scheduler_status(handle)
            if len({r["job_id"] for r in status["reports"]} & ids) == len(ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the trainers' reports did not all arrive")
            time.sleep(0.5)
    finally:
        stop_scheduler(handle, release=False, timeout=30)
    with session_scope(engine) as session:
        (run,) = crud.refresh_nightly_runs(session=session, run_dates=[NIGHT])
        gates: dict[str, int] = {}
        for job in jobs:
            for prefix in crud.list_prefixes(session=session, tenant_id=job.tenant_id):
                if prefix.job_id == job.id:
                    outcome_name = str(prefix.metrics.get("quality_gate", "-"))
                    gates[outcome_name] = gates.get(outcome_name, 0) + 1
    job_seconds = {
        str(j.id): (j.finished_at - j.started_at).total_seconds()
        for j in jobs
        if j.started_at and j.finished_at
    }
    durations = list(job_seconds.values())
    done = [
        r for r in status["reports"] if r["job_id"] in job_seconds and r["outcome"] == "succeeded"
    ]
    phases = {
        phase: statistics.median(r["phases"].get(phase, 0.0) for r in done) for phase in PHASES
    }
    phases["outside the trainer"] = statistics.median(
        job_seconds[r["job_id"]] - r["seconds"] for r in done
    )
    # Everything but training itself: the per-job overhead.
    overhead = statistics.median(job_seconds[r["job_id"]] - r["phases"]["train"] for r in done)
    engine.dispose()
    wall = run.wall_seconds or float("nan")
    return {
        "slots": slots,
        "warm": warm,
        "warm_jobs": sum(bool(r.get("warm")) for r in done),
        "overhead_median_s": overhead,
        "reported": len(done),
        "phases": phases,
        "planned": planned,
        "skipped": len(outcome.plan.skipped),
        "never_trained": sum(t.reason == "never trained" for t in outcome.plan.tenants),
        "planning_s": outcome.seconds,
        "scheduler_start_s": scheduler_start,
        "wall_s": wall,
        "jobs_per_hour": planned / wall * 3600,
        "job_median_s": statistics.median(durations),
        "succeeded": run.jobs_succeeded,
        "failed": run.jobs_failed,
        "kept_inactive": run.prefixes_kept_inactive,
        "gates": gates,
        "estimated_tokens": run.estimated_tokens,
        "rerun_created": rerun.plan.created,
        "cpu_seconds": night_cpu["cpu_seconds"],
        "processes_started": night_cpu["processes_started"],
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"One nightly run over **{args.tenants} tenants with new data** "
        f"({results[0]['never_trained']} never trained, the others with a previous version and "
        f"one new dataset) plus {args.unchanged} unchanged tenants, {args.examples} examples "
        f"per dataset, on a **tiny random Llama built from a config** (2 layers, hidden 64; "
        f"tests/fixtures/models.py) — so the figures measure the queue (planning, claiming, the "
        f"trainer process, data reads, the quality gate, publishing), not model compute. "
        f"SQLite and a blob directory (the single-machine mode), a local Ray with "
        f"{max(args.slots) + max(args.warm)} CPUs, hyperparameters `{json.dumps(PARAMS)}` plus "
        f"the nightly validation split. **Warm processes 0** is the baseline: a trainer process "
        f"started for each job after its claim, as before the warm pool "
        f"(`PREFIXD_TRAINER_WARM_PROCESSES=0`); **N > 0**: N prepared processes wait for jobs "
        f"(workers/trainer_pool.py). A job's time runs from its claim to its publish.",
        "",
        "| trainer slots | warm processes | jobs | wall time | jobs/hour | median job | "
        "median overhead (job − training) | jobs run in a warm process | planning | skipped | "
        "succeeded / failed | gate: passed / kept inactive / not compared | rerun enqueued |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gates = r["gates"]
        not_compared = sum(v for k, v in gates.items() if k not in ("passed", "kept_inactive"))
        lines.append(
            f"| {r['slots']} | {r['warm']} | {r['planned']} | {r['wall_s']:.0f} s | "
            f"{r['jobs_per_hour']:.0f} | {r['job_median_s']:.2f} s | "
            f"{r['overhead_median_s']:.2f} s | {r['warm_jobs']} / {r['reported']} | {r['planning_s'] * 1000:.0f} ms | "
            f"{r['skipped']} | {r['succeeded']} / {r['failed']} | {gates.get('passed', 0)} / "
            f"{gates.get('kept_inactive', 0)} / {not_compared} | {r['rerun_created']} |"
        )
    ratios = []
    for r in results:
        base = next(
            (b for b in results if b["slots"] == r["slots"] and b["warm"] == 0 and b is not r),
            None,
        )
        if base is not None:
            ratios.append(
                f"{r['slots']} slot(s), {r['warm']} warm: median job "
                f"{r['job_median_s'] / base['job_median_s']:.2f}× the baseline's, median "
                f"overhead {r['overhead_median_s'] / base['overhead_median_s']:.2f}×, jobs/hour "
                f"{r['jobs_per_hour'] / base['jobs_per_hour']:.2f}×"
            )
    if ratios:
        lines += [
            "",
            "Against the baseline (0 warm processes, same slots): " + "; ".join(ratios) + ".",
        ]
    lines += [
        "",
        "Where a job's time goes (medians over the succeeded jobs, from the trainers' reports: "
        "`prepare` is the process's own start — imports, connections, the model mapped — paid "
        "in the job only without a warm process; `outside the trainer` is the claim to the "
        "trainer's start plus its end to the job row):",
        "",
        "| trainer slots | warm processes | " + " | ".join(PHASES) + " | outside the trainer |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for r in results:
        cells = " | ".join(f"{r['phases'][p]:.2f} s" for p in (*PHASES, "outside the trainer"))
        lines.append(f"| {r['slots']} | {r['warm']} | {cells} |")
    starts = ", ".join(f"{r['scheduler_start_s']:.0f} s" for r in results)
    cpu = "; ".join(
        f"{r['slots']} slot(s), {r['warm']} warm: {r['cpu_seconds']:.0f} CPU s, "
        f"{r['cpu_seconds'] / r['planned']:.1f} per job, {r['processes_started']} processes "
        f"started, {r['cpu_seconds'] / r['wall_s']:.2f} cores busy on average"
        for r in results
    )
    lines += [
        "",
        f"Scheduler start (model shared once, not in the wall time): {starts}. "
        f"Estimated training tokens of the night: {results[0]['estimated_tokens']} "
        '(bytes / 4 × epochs). Quality gate: "not compared" are tenants without an active '
        'version; "kept inactive" prefixes lost to the previous version on held-out examples '
        "it never trained on. A second planning pass the same night enqueued the number in "
        "the last column (idempotency keys `nightly-<date>`).",
        "",
        "CPU of the night (planning to the last job's end; this process and its descendants: "
        f"Ray, the scheduler, every trainer process, sampled every 0.5 s): {cpu}.",
    ]
    if args.tenants != 50:
        lines += ["", f"Reduced run: {args.tenants} tenants instead of 50 (a busy shared machine)."]
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m bench.nightly "
        f"--tenants {args.tenants} --unchanged {args.unchanged} --examples {args.examples} "
        f"--slots {' '.join(str(s) for s in args.slots)} "
        f"--warm {' '.join(str(w) for w in args.warm)}`",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=50, help="tenants with new data")
    parser.add_argument("--unchanged", type=int, default=10, help="tenants without new data")
    parser.add_argument("--examples", type=int, default=24, help="examples per first dataset")
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--warm",
        type=int,
        nargs="+",
        default=[0, 2],
        help="warm trainer processes (0: a process started per job, the baseline)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per night")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()

    import ray

    from tests.fixtures.models import build_tiny_model_dir

    with tempfile.TemporaryDirectory(prefix="prefixd-bench-nightly-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model_dir(root / "model", "llama")
        loaded = load_model(str(model_dir), settings=Settings(home=root / "home"))
        ray.init(
            address="local",  # never join another cluster on this machine
            # A warm process holds a trainer's CPU while it waits.
            num_cpus=max(args.slots) + max(args.warm),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            results = []
            for slots in args.slots:
                for warm in args.warm:
                    where = root / f"slots-{slots}-warm-{warm}"
                    results.append(measure(where, model_dir, loaded, args, slots, warm))
                    print(json.dumps(results[-1]), flush=True)
        finally:
            ray.shutdown()
    body = report(results, args)
    print(body)
    if not args.no_write:
        print("wrote", write_section(SECTION, body))


if __name__ == "__main__":
    main()
