"""The nightly planner (workers/nightly.py) on real databases (SQLite and PostgreSQL): who is
planned, idempotency per night, the claim order against interactive jobs, the nightly_runs
record, ``prefixd nightly``, and the built-in schedule of ``prefixd worker --nightly-at``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from common.db import crud
from common.db.models import Dataset, JobPriority, JobState, NightlyRun, Tenant, TrainingJob
from common.db.types import utcnow
from common.errors import InvalidInputError
from prefixd.cli import app
from tests.fixtures.factories import make_dataset, make_job, make_prefix_create, make_tenant
from tests.fixtures.services import empty_tables
from workers.nightly import (
    NightlyRunner,
    NightlySchedule,
    enqueue_plan,
    estimate_tokens,
    parse_changed_since,
    parse_time_of_day,
    plan_nightly,
    run_nightly,
)

NIGHT = date(2031, 3, 14)
LAST = {"prefix_length": 6, "epochs": 3, "learning_rate": 0.01, "seed": 7}


def train(
    session: Session,
    tenant: Tenant,
    datasets: list[Dataset],
    *,
    hyperparameters: dict[str, Any] | None = None,
    activate: bool = True,
) -> TrainingJob:
    """A succeeded job over ``datasets`` that published a version (active or not)."""
    job = make_job(session, tenant, datasets=datasets, hyperparameters=hyperparameters or LAST)
    owner = f"w-{uuid.uuid4().hex}"
    claimed = crud.claim_oldest_job(session=session, owner=owner, lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    crud.publish_prefix(
        session=session,
        job_id=job.id,
        owner=owner,
        prefix_in=make_prefix_create(tenant),
        activate=activate,
    )
    return job


def uploaded_later(session: Session, tenant: Tenant, minutes: int = 1, **kw: Any) -> Dataset:
    """A dataset uploaded after everything so far."""
    dataset = make_dataset(session, tenant, **kw)
    dataset.created_at = utcnow() + timedelta(minutes=minutes)
    session.add(dataset)
    session.commit()
    session.refresh(dataset)
    return dataset


def tenant_of(session: Session, job_id: Any) -> Tenant:
    job = session.get(TrainingJob, job_id)
    assert job is not None
    tenant = session.get(Tenant, job.tenant_id)
    assert tenant is not None
    return tenant


def planned(plan: Any) -> dict[str, Any]:
    return {t.tenant_name: t for t in plan.tenants}


def skipped(plan: Any) -> dict[str, str]:
    return {s.tenant_name: s.reason for s in plan.skipped}


def test_only_tenants_with_new_data_or_never_trained_are_planned(session: Session) -> None:
    fresh = make_tenant(session, name="fresh")  # never trained
    fresh_data = [make_dataset(session, fresh, example_count=5) for _ in range(2)]
    changed = make_tenant(session, name="changed")
    old = make_dataset(session, changed, example_count=20)
    train(session, changed, [old])
    new = uploaded_later(session, changed, example_count=4)
    unchanged = make_tenant(session, name="unchanged")
    train(session, unchanged, [make_dataset(session, unchanged)])
    make_tenant(session, name="empty")  # no datasets
    gated = make_tenant(session, name="gated")  # newest version kept inactive: trained on it
    first = make_dataset(session, gated)
    active_job = train(session, gated, [first], hyperparameters=LAST | {"epochs": 9})
    second = uploaded_later(session, gated)
    train(session, gated, [first, second], activate=False)
    leaving = make_tenant(session, name="leaving")
    make_dataset(session, leaving)
    crud.mark_tenant_deleting(session=session, tenant_id=leaving.id)
    tiny = make_tenant(session, name="tiny")
    make_dataset(session, tiny, example_count=1)
    busy = make_tenant(session, name="busy")  # its own job is queued: next night
    make_dataset(session, busy)
    make_job(session, busy)

    plan = plan_nightly(session=session, run_date=NIGHT, validation_split=0.2)

    assert list(planned(plan)) == ["fresh", "changed"]  # never trained first
    one = planned(plan)["fresh"]
    assert (one.reason, one.dataset_ids, one.examples) == (
        "never trained",
        [d.id for d in fresh_data],
        10,
    )
    assert one.hyperparameters == {"validation_split": 0.2, "validation_split_method": "hash"}
    two = planned(plan)["changed"]
    assert (two.reason, two.dataset_ids, two.new_datasets, two.examples) == (
        "new data",
        [old.id, new.id],
        1,
        24,
    )
    assert two.hyperparameters == LAST | {
        "validation_split": 0.2,
        "validation_split_method": "hash",
    }
    assert two.trained_version == 1 and two.job_id is None
    assert two.estimated_tokens == estimate_tokens(two.size_bytes, two.hyperparameters) > 0
    assert plan.estimated_tokens == one.estimated_tokens + two.estimated_tokens
    assert skipped(plan) == {
        "unchanged": "no new data since version 1",
        "empty": "no datasets",
        "gated": "no new data since version 2",
        "leaving": "being deleted",
        "tiny": "1 example(s): a nightly job needs 2 (it holds some out)",
        "busy": "has a queued or running job; left for the next night",
    }

    # New data after the inactive version: retrained with the *active* version's settings.
    third = uploaded_later(session, gated, minutes=2)
    again = planned(plan_nightly(session=session, run_date=NIGHT, validation_split=0.2))
    assert again["gated"].dataset_ids == [first.id, second.id, third.id]
    assert again["gated"].hyperparameters["epochs"] == active_job.hyperparameters["epochs"] == 9


def test_since_and_limit(session: Session) -> None:
    stale = make_tenant(session, name="stale")
    train(session, stale, [make_dataset(session, stale)])
    recent = make_tenant(session, name="recent")
    train(session, recent, [make_dataset(session, recent)])
    uploaded_later(session, stale, minutes=1)
    uploaded_later(session, recent, minutes=30)
    newcomer = make_tenant(session, name="newcomer")
    make_dataset(session, newcomer)

    plan = plan_nightly(session=session, run_date=NIGHT, limit=2)
    # Stalest first: never trained, then the oldest training.
    assert list(planned(plan)) == ["newcomer", "stale"]
    assert skipped(plan) == {"recent": "over the limit of 2"}

    since = utcnow() + timedelta(minutes=10)
    plan = plan_nightly(session=session, run_date=NIGHT, since=since)
    assert list(planned(plan)) == ["recent"]
    assert set(skipped(plan)) == {"stale", "newcomer"}
    assert skipped(plan)["stale"] == "no new data since version 1"


def test_twice_in_one_night_enqueues_nothing_new(db_engine) -> None:
    with Session(db_engine) as session:
        tenants = [make_tenant(session) for _ in range(3)]
        for tenant in tenants:
            make_dataset(session, tenant)

    first = run_nightly(db_engine, run_date=NIGHT, validation_split=0.1)
    second = run_nightly(db_engine, run_date=NIGHT, validation_split=0.1)

    assert first.plan.created == 3 and second.plan.created == 0
    assert {t.job_id for t in first.plan.tenants} == {t.job_id for t in second.plan.tenants}
    assert {t.reason for t in second.plan.tenants} == {"already enqueued tonight"}
    with Session(db_engine) as session:
        jobs = session.exec(select(TrainingJob)).all()
        assert len(jobs) == 3
        assert {(j.priority, j.idempotency_key, j.state) for j in jobs} == {
            (JobPriority.batch, "nightly-2031-03-14", JobState.queued)
        }
        (run,) = session.exec(select(NightlyRun)).all()
    assert (run.run_date, run.planner_runs, run.tenants_planned, run.tenants_skipped) == (
        NIGHT,
        2,
        3,
        0,
    )
    assert run.estimated_tokens == first.plan.estimated_tokens > 0
    assert run.planned_at is not None and run.finished_at is None


def test_interactive_jobs_are_claimed_before_the_remaining_nightly_jobs(session: Session) -> None:
    tenants = [make_tenant(session) for _ in range(3)]
    for tenant in tenants:
        make_dataset(session, tenant)
    plan = enqueue_plan(session=session, plan=plan_nightly(session=session, run_date=NIGHT))
    nightly_jobs = {t.job_id for t in plan.tenants}
    assert len(nightly_jobs) == 3
    started = crud.claim_next_job(session=session, owner="t1", lease_seconds=60)
    assert started is not None and started.id in nightly_jobs  # the nightly run is under way

    latecomer = make_tenant(session)
    interactive = make_job(session, latecomer)  # submitted during the nightly run
    nxt = crud.claim_next_job(session=session, owner="t2", lease_seconds=60)
    assert nxt is not None and nxt.id == interactive.id
    rest = [crud.claim_next_job(session=session, owner=f"t{i}", lease_seconds=60) for i in (3, 4)]
    assert {j.id for j in rest if j is not None} == nightly_jobs - {started.id}


def test_the_run_row_is_completed_once_every_job_is_final(db_engine) -> None:
    with Session(db_engine) as session:
        for _ in range(4):
            make_dataset(session, make_tenant(session))
        make_tenant(session)  # skipped: no datasets
    outcome = run_nightly(db_engine, run_date=NIGHT)
    jobs = [t.job_id for t in outcome.plan.tenants]
    assert outcome.run is not None and outcome.run.tenants_skipped == 1
    with Session(db_engine) as session:
        owners = {}
        for i in range(4):
            job = crud.claim_next_job(session=session, owner=f"o{i}", lease_seconds=60)
            assert job is not None
            owners[job.id] = f"o{i}"
        ok, gated, bad, stopped = jobs
        crud.publish_prefix(
            session=session,
            job_id=ok,
            owner=owners[ok],
            prefix_in=make_prefix_create(tenant_of(session, ok)),
        )
        crud.publish_prefix(
            session=session,
            job_id=gated,
            owner=owners[gated],
            activate=False,
            prefix_in=make_prefix_create(tenant_of(session, gated)),
            note="kept inactive by the nightly quality gate: …",
        )
        crud.finish_job(
            session=session, job_id=bad, owner=owners[bad], state=JobState.failed, error="x"
        )
        # Read live while a job still runs: counts so far, not finished.
        (live,) = crud.list_nightly_runs(session=session)
        assert (live.jobs_succeeded, live.prefixes_kept_inactive, live.jobs_failed) == (2, 1, 1)
        assert live.finished_at is None
        stored = crud.get_nightly_run(session=session, run_date=NIGHT)
        assert stored is not None and stored.jobs_succeeded == 0  # reading stored nothing
        crud.cancel_job(session=session, job_id=stopped)

        (run,) = crud.refresh_nightly_runs(session=session)
        assert (run.tenants_planned, run.jobs_succeeded, run.jobs_failed, run.jobs_cancelled) == (
            4,
            2,
            1,
            1,
        )
        assert run.prefixes_kept_inactive == 1
        assert run.finished_at is not None and run.wall_seconds is not None
        assert run.finished_at >= run.planned_at >= run.started_at  # type: ignore[operator]
        assert crud.refresh_nightly_runs(session=session) == []  # nothing unfinished left
        public = crud.list_nightly_runs(session=session)
        assert [r.run_date for r in public] == [NIGHT] and public[0].jobs_cancelled == 1


def test_prefixd_nightly_dry_run_plan_and_report(db_engine, monkeypatch) -> None:
    monkeypatch.setenv("PREFIXD_DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    with Session(db_engine) as session:
        tenant = make_tenant(session, name="acme")
        make_dataset(session, tenant, example_count=12)
        make_tenant(session, name="nobody")
    cli = CliRunner()

    result = cli.invoke(app, ["nightly", "--dry-run", "--date", "2031-03-14"])
    assert result.exit_code == 0, result.output
    assert "acme" in result.stdout and "never trained" in result.stdout and "12" in result.stdout
    assert "nobody" in result.stdout and "no datasets" in result.stdout
    assert "dry run: nothing was enqueued" in result.stdout
    with Session(db_engine) as session:
        assert session.exec(select(TrainingJob)).all() == []
        assert session.exec(select(NightlyRun)).all() == []

    result = cli.invoke(app, ["nightly", "--date", "2031-03-14", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [(t["tenant"], t["created"]) for t in body["tenants"]] == [("acme", True)]
    result = cli.invoke(app, ["nightly", "--date", "2031-03-14", "--json"])
    assert json.loads(result.stdout)["created"] == 0

    result = cli.invoke(app, ["nightly", "--report"])
    assert result.exit_code == 0, result.output
    assert "2031-03-14" in result.stdout
    result = cli.invoke(app, ["nightly", "--report", "--json"])
    (row,) = json.loads(result.stdout)
    assert (row["planner_runs"], row["tenants_planned"], row["tenants_skipped"]) == (2, 1, 1)

    for args, message in (
        (["--since", "yesterday"], "invalid time 'yesterday'"),
        (["--changed-since", "24x"], "invalid duration '24x'"),
        (["--since", "2031-03-13", "--changed-since", "24h"], "not both"),
        (["--date", "14.3.2031"], "invalid date"),
        (["--report", "--dry-run"], "--report takes no planning options"),
    ):
        result = cli.invoke(app, ["nightly", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


def test_parsers() -> None:
    now = datetime(2031, 3, 14, 12, tzinfo=UTC)
    assert parse_changed_since("24h", now=now) == now - timedelta(hours=24)
    assert parse_changed_since("90m", now=now) == now - timedelta(minutes=90)
    assert parse_changed_since("2d", now=now) == now - timedelta(days=2)
    assert parse_time_of_day("02:00") == time(2, 0)
    for bad in ("2am", "25:00", ""):
        with pytest.raises(InvalidInputError, match="expected HH:MM"):
            parse_time_of_day(bad)


def test_schedule_is_due_once_a_day_and_at_once_when_started_late() -> None:
    at = time(2, 0)
    early = NightlySchedule(at, datetime(2031, 3, 14, 1, 0))
    assert early.due(datetime(2031, 3, 14, 1, 59)) is None
    assert early.due(datetime(2031, 3, 14, 2, 0)) == date(2031, 3, 14)
    assert early.due(datetime(2031, 3, 14, 2, 1)) is None  # once a night
    assert early.due(datetime(2031, 3, 15, 1, 59)) is None
    assert early.due(datetime(2031, 3, 15, 2, 0, 30)) == date(2031, 3, 15)
    late = NightlySchedule(at, datetime(2031, 3, 14, 2, 30))  # a worker (re)started after 02:00
    assert late.due(datetime(2031, 3, 14, 2, 30)) == date(2031, 3, 14)
    assert late.due(datetime(2031, 3, 14, 3, 0)) is None


def test_worker_schedule_runs_the_planner_and_a_restart_enqueues_nothing(pg_engine) -> None:
    with Session(pg_engine) as session:
        make_dataset(session, make_tenant(session, name="sched"))
    today = date.today()
    started = datetime.combine(today, time(2, 0)) + timedelta(minutes=5)
    runner = NightlyRunner(pg_engine, time(2, 0), validation_split=0.1, now=started)
    (line,) = runner.poll(started)
    assert f"nightly {today}: 1 tenant(s) planned, 1 new job(s)" in line
    assert runner.poll(started + timedelta(seconds=2)) == []
    restarted = NightlyRunner(pg_engine, time(2, 0), validation_split=0.1, now=started)
    (line,) = restarted.poll(started + timedelta(minutes=1))
    assert "1 tenant(s) planned, 0 new job(s)" in line
    with Session(pg_engine) as session:
        jobs = session.exec(
            select(TrainingJob).where(col(TrainingJob.priority) == JobPriority.batch)
        ).all()
        assert len(jobs) == 1
        run = crud.get_nightly_run(session=session, run_date=today)
        assert run is not None and run.planner_runs == 2


def test_the_kuberay_cronjob_runs_this_command(session: Session, db_engine, monkeypatch) -> None:
    import yaml

    path = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "nightly-cronjob.yaml"
    cronjob = yaml.safe_load(path.read_text())
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    entrypoint = command[command.index("--") + 1 :]
    assert entrypoint[:2] == ["prefixd", "nightly"]
    make_dataset(session, make_tenant(session, name="cron"))
    monkeypatch.setenv("PREFIXD_DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    result = CliRunner().invoke(app, [*entrypoint[1:], "--dry-run"])
    assert result.exit_code == 0 and "cron" in result.stdout, result.output


def test_a_tenant_deleted_after_planning_is_skipped_at_enqueue(session: Session) -> None:
    tenant = make_tenant(session, name="gone")
    make_dataset(session, tenant)
    plan = plan_nightly(session=session, run_date=NIGHT)
    assert list(planned(plan)) == ["gone"]
    crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
    plan = enqueue_plan(session=session, plan=plan)
    assert plan.tenants == [] and skipped(plan)["gone"].startswith("not enqueued: tenant")
    assert session.exec(select(TrainingJob)).all() == []


def test_worker_refuses_a_bad_nightly_time_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["worker", "--nightly-at", "2am"])
    assert result.exit_code == 2 and "invalid time of day '2am'" in result.stderr, result.output


# --- planning at scale: batches of tenants, a fixed number of statements each ---------------


def mixed_tenants(engine: Engine, n: int) -> None:
    """``n`` tenants, every other one trained and then given new data (the others never
    trained): every one is planned tonight."""
    with Session(engine) as session:
        for i in range(n):
            tenant = make_tenant(session)
            first = make_dataset(session, tenant)
            if i % 2:
                train(session, tenant, [first])
                uploaded_later(session, tenant)


def statements_of(engine: Engine, work: Any) -> tuple[int, Any]:
    """How many SQL statements ``work()`` sent, and its result."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        result = work()
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    return len(sent), result


def test_a_pass_sends_as_many_statements_for_200_tenants_as_for_10(pg_engine) -> None:
    """Planning reads a page of tenants in a fixed number of queries and enqueues a batch of
    jobs in one transaction: nothing is sent per tenant."""
    counts = {}
    for n in (10, 200):
        empty_tables(pg_engine)
        mixed_tenants(pg_engine, n)
        dry, plan = statements_of(
            pg_engine, lambda: run_nightly(pg_engine, run_date=NIGHT, dry_run=True)
        )
        real, outcome = statements_of(pg_engine, lambda: run_nightly(pg_engine, run_date=NIGHT))
        again, repeat = statements_of(pg_engine, lambda: run_nightly(pg_engine, run_date=NIGHT))
        assert len(plan.plan.tenants) == outcome.plan.created == n and repeat.plan.created == 0
        counts[n] = {"dry run": dry, "real run": real, "second pass": again}
    assert counts[10] == counts[200]


def test_a_plan_read_in_pages_is_the_plan_read_at_once_and_enqueued_once(db_engine) -> None:
    with Session(db_engine) as session:
        for i in range(13):
            tenant = make_tenant(session, name=f"t{i:02d}")
            data = make_dataset(session, tenant, example_count=1 if i == 3 else 10)
            if i % 3 == 1:
                train(session, tenant, [data])
                if i != 4:
                    uploaded_later(session, tenant, minutes=i)
        crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
        make_tenant(session, name="empty")
    with Session(db_engine) as session:
        whole = plan_nightly(session=session, run_date=NIGHT)
        paged = plan_nightly(session=session, run_date=NIGHT, batch_size=4)
        assert paged == whole and len(whole.tenants) == 10 and len(whole.skipped) == 4
        # Listed in the order the tenants were made (those never trained first, as ever).
        assert [s.tenant_name for s in whole.skipped] == ["t03", "t04", "t12", "empty"]
        enqueued = enqueue_plan(session=session, plan=paged, batch_size=3)
        assert enqueued.created == 10 and enqueued.skipped == whole.skipped
        again = enqueue_plan(
            session=session,
            plan=plan_nightly(session=session, run_date=NIGHT, batch_size=4),
            batch_size=3,
        )
        assert again.created == 0
        assert {t.job_id for t in again.tenants} == {t.job_id for t in enqueued.tenants}
        jobs = session.exec(select(TrainingJob).where(col(TrainingJob.nightly_run_date) == NIGHT))
        assert len(jobs.all()) == 10


def test_a_dataset_deleted_after_planning_keeps_only_its_tenant_out(session: Session) -> None:
    kept, emptied = make_tenant(session, name="kept"), make_tenant(session, name="emptied")
    make_dataset(session, kept)
    gone = make_dataset(session, emptied)
    plan = plan_nightly(session=session, run_date=NIGHT)
    crud.delete_dataset(session=session, tenant_id=emptied.id, dataset_id=gone.id)
    plan = enqueue_plan(session=session, plan=plan)
    assert [t.tenant_name for t in plan.tenants] == ["kept"] and plan.created == 1
    assert skipped(plan) == {"emptied": f"not enqueued: dataset(s) not found: {gone.id}"}


def test_a_tenant_erased_during_the_batch_insert_costs_only_its_own_job(pg_engine) -> None:
    """The row of a tenant goes between the batch's checks and its INSERT (an erasure
    finishing): the batch is enqueued again one job at a time, without that tenant."""
    with Session(pg_engine) as session:
        tenants = [make_tenant(session, name=f"t{i}") for i in range(3)]
        for tenant in tenants:
            make_dataset(session, tenant)
        victim = tenants[1].id
        plan = plan_nightly(session=session, run_date=NIGHT)
    erased: list[int] = []

    def erase_at_the_insert(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO training_jobs") and not erased:
            with pg_engine.begin() as other:  # another connection, committed at once
                erased.append(
                    other.execute(sa.delete(Tenant).where(col(Tenant.id) == victim)).rowcount
                )

    sa.event.listen(pg_engine, "before_cursor_execute", erase_at_the_insert)
    try:
        with Session(pg_engine) as session:
            plan = enqueue_plan(session=session, plan=plan)
    finally:
        sa.event.remove(pg_engine, "before_cursor_execute", erase_at_the_insert)
    assert erased == [1]
    assert [t.tenant_name for t in plan.tenants] == ["t0", "t2"] and plan.created == 2
    assert skipped(plan) == {"t1": f"not enqueued: tenant {victim} not found"}
