"""Nightly batch retraining: which tenants to retrain tonight, and their jobs.

    plan = plan_nightly(session=session, run_date=date.today())     # reads only
    plan = enqueue_plan(session=session, plan=plan)                  # one batch job per tenant
    outcome = run_nightly(engine, run_date=...)                      # both + the nightly_runs row

**Who is planned.** Every active tenant with at least one dataset that was never trained or
has *new data*: a dataset uploaded after the job of its **newest** prefix version was
submitted and not read by it. The newest, not the active one: a version the quality gate
kept inactive, or one the tenant rolled back from, was trained on that data already, so it
is not retrained night after night. ``since`` additionally requires a new dataset (any, for a
tenant never trained) at or after it. Removing a dataset alone triggers nothing. Skipped,
with the reason in the plan: a tenant with a queued or running job (next night), one with
fewer than two examples (a nightly job holds some out), those past ``limit`` (stalest
first: never trained, then oldest training).

**The job.** All of the tenant's current datasets, oldest first; the hyperparameters of the
active version's job (else the newest version's; ``defaults`` for a tenant never trained),
holding out ``validation_split`` when they hold out nothing, always with the stable ``hash``
split (:mod:`workers.quality_gate`); priority ``batch``; idempotency key ``nightly-<date>``,
so planning the same night again enqueues nothing new.

**The record.** One ``nightly_runs`` row per night, made by the first pass and updated by
each. Job counts and ``finished_at``/``wall_seconds`` are stored by :func:`refresh_runs`
(at the start of every pass, by ``prefixd nightly --report``, every minute by ``prefixd
worker --nightly-at``); ``GET /v1/admin/nightly/runs`` reads them live for an open night.
"""

from __future__ import annotations

import logging
import time as _time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from common.db import crud
from common.db.engine import session_scope
from common.db.models import (
    JobPriority,
    NightlyRun,
    TenantStatus,
    TrainingJobCreate,
)
from common.errors import InvalidInputError, PrefixdError
from common.training_budget import AUTOMATIC_EPOCHS, HASH_SPLIT

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4  # a rough figure for English text and BPE tokenizers
MIN_EXAMPLES = 2  # one to train on and one held out


@dataclass(frozen=True)
class TenantPlan:
    """One tenant's nightly job (planned, or already enqueued tonight)."""

    tenant_id: uuid.UUID
    tenant_name: str
    reason: str
    dataset_ids: list[uuid.UUID]
    new_datasets: int
    examples: int
    size_bytes: int
    estimated_tokens: int
    hyperparameters: dict[str, Any]
    trained_version: int | None  # the newest version so far (None: never trained)
    job_id: uuid.UUID | None = None  # tonight's job, once enqueued
    created: bool = False  # enqueued by this pass (False: found from an earlier pass)


@dataclass(frozen=True)
class SkippedTenant:
    tenant_id: uuid.UUID
    tenant_name: str
    reason: str


@dataclass(frozen=True)
class NightlyPlan:
    run_date: date
    idempotency_key: str
    since: datetime | None
    tenants: list[TenantPlan] = field(default_factory=list)
    skipped: list[SkippedTenant] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.tenants)

    @property
    def estimated_tokens(self) -> int:
        return sum(t.estimated_tokens for t in self.tenants)

    @property
    def created(self) -> int:
        return sum(t.created for t in self.tenants)


def parse_changed_since(text: str, *, now: datetime) -> datetime:
    """``24h``, ``90m``, ``2d``, ``3600s`` → ``now`` minus that."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if unit not in units or amount < 0:
        raise InvalidInputError(
            f"invalid duration {text!r}: expected a number and a unit s, m, h or d (e.g. 24h)"
        )
    return now - timedelta(seconds=amount * units[unit])


def parse_since(text: str) -> datetime:
    """An ISO 8601 time; without a timezone it is local time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            f"invalid time {text!r}: expected ISO 8601, e.g. 2025-01-31T02:00:00+00:00"
        ) from None
    return value if value.tzinfo is not None else value.astimezone()


def nightly_hyperparameters(last: dict[str, Any] | None, validation_split: float) -> dict[str, Any]:
    """The last hyperparameters, always holding out a stable (hash) validation split."""
    params = dict(last or {})
    if not params.get("validation_split"):
        params["validation_split"] = validation_split
    params["validation_split_method"] = HASH_SPLIT
    return params


def estimate_tokens(size_bytes: int, params: dict[str, Any]) -> int:
    """Training tokens of a job: its data's bytes / ``BYTES_PER_TOKEN``, less the
    held-out part, times the epochs (the automatic budget's nominal epochs when unset: an
    estimate, as its floor and ceiling and early stopping move the real count)."""
    epochs = int(params.get("epochs") or AUTOMATIC_EPOCHS)
    held_out = float(params.get("validation_split") or 0.0)
    return round(size_bytes * (1.0 - held_out) / BYTES_PER_TOKEN) * epochs


PLANNING_BATCH_SIZE = 1000  # tenants per batch: each batch is a fixed number of queries


def _new_datasets(
    datasets: Sequence[crud.PlanningDataset], version: crud.PlanningVersion
) -> list[crud.PlanningDataset]:
    job = version.job
    if job is None:  # the version's job is unknown: what arrived after the version
        return [d for d in datasets if d.created_at > version.created_at]
    read = {str(d) for d in job.dataset_ids}
    if job.validation_dataset_id is not None:
        read.add(str(job.validation_dataset_id))
    return [d for d in datasets if d.created_at > job.created_at and str(d.id) not in read]


@dataclass
class _Planning:
    """A planning pass in progress: what the batches found so far."""

    run_date: date
    since: datetime | None
    validation_split: float
    defaults: dict[str, Any] | None
    # Each with a sort key: pages come in tenant id order, a plan lists tenants in the order
    # they were created (candidates: stalest first, then that order).
    existing: list[tuple[Any, TenantPlan]] = field(default_factory=list)
    candidates: list[tuple[Any, TenantPlan]] = field(default_factory=list)
    skipped: list[tuple[Any, SkippedTenant]] = field(default_factory=list)

    def add_batch(self, session: Session, tenants: Sequence[crud.PlanningTenant]) -> None:
        """Plan one batch of tenants: at most five queries, whatever the batch holds."""
        batch = crud.planning_batch(session=session, page=tenants, run_date=self.run_date)
        chosen: list[tuple[crud.PlanningTenant, str, list[crud.PlanningDataset], int]] = []
        for tenant in tenants:
            own = batch.datasets.get(tenant.id, [])
            version = batch.newest.get(tenant.id)
            job = batch.tonight.get(tenant.id)
            created = (tenant.created_at, tenant.id)
            if job is not None:  # planned by an earlier pass tonight
                self.existing.append((created, _already_enqueued(tenant, job, own, version)))
                continue
            fresh = self._fresh(own, version)
            reason = _skip_reason(tenant, own, fresh, version, batch.busy, self.since)
            if reason is not None:
                self.skipped.append((created, SkippedTenant(tenant.id, tenant.name, reason)))
                continue
            why = "never trained" if version is None else "new data"
            chosen.append((tenant, why, own, len(fresh)))
        if not chosen:
            return
        trained_by: dict[uuid.UUID, uuid.UUID | None] = {}
        for tenant, *_ in chosen:
            version = batch.newest.get(tenant.id)
            trained_by[tenant.id] = version.job.id if version and version.job else None
        last_params = crud.last_hyperparameters(session=session, tenants=trained_by)
        for tenant, reason, own, new in chosen:
            version = batch.newest.get(tenant.id)
            last = last_params.get(tenant.id)
            params = nightly_hyperparameters(
                last if last is not None else self.defaults, self.validation_split
            )
            size = sum(d.size_bytes for d in own)
            plan = TenantPlan(
                tenant.id,
                tenant.name,
                reason,
                [d.id for d in own],
                new,
                sum(d.example_count for d in own),
                size,
                estimate_tokens(size, params),
                params,
                version.version if version else None,
            )
            if version is None:
                staleness = (0, own[0].created_at)  # waiting since its first upload
            else:
                trained = version.job.created_at if version.job else version.created_at
                staleness = (1, trained)
            self.candidates.append(((*staleness, tenant.created_at, tenant.id), plan))

    def _fresh(
        self, own: list[crud.PlanningDataset], version: crud.PlanningVersion | None
    ) -> list[crud.PlanningDataset]:
        """The datasets that call for a job: all of a tenant never trained, else the new
        ones; with ``since``, only those uploaded at or after it."""
        fresh = own if version is None else _new_datasets(own, version)
        if self.since is not None:
            fresh = [d for d in fresh if d.created_at >= self.since]
        return fresh


def _skip_reason(
    tenant: crud.PlanningTenant,
    own: list[crud.PlanningDataset],
    fresh: list[crud.PlanningDataset],
    version: crud.PlanningVersion | None,
    busy: set[uuid.UUID],
    since: datetime | None,
) -> str | None:
    """Why the tenant gets no job tonight (None: it gets one)."""
    if tenant.status != TenantStatus.active:
        return "being deleted"
    if not own:
        return "no datasets"
    if not fresh:
        if version is None:
            return f"no dataset since {since.isoformat() if since else '-'}"
        return f"no new data since version {version.version}"
    if tenant.id in busy:
        return "has a queued or running job; left for the next night"
    examples = sum(d.example_count for d in own)
    if examples < MIN_EXAMPLES:
        return f"{examples} example(s): a nightly job needs {MIN_EXAMPLES} (it holds some out)"
    return None


def _already_enqueued(
    tenant: crud.PlanningTenant,
    job: crud.PlanningJob,
    own: list[crud.PlanningDataset],
    version: crud.PlanningVersion | None,
) -> TenantPlan:
    params = job.hyperparameters or {}
    by_id = {d.id: d for d in own}
    job_datasets = [uuid.UUID(str(d)) for d in job.dataset_ids]
    used = [by_id[d] for d in job_datasets if d in by_id]
    size = sum(d.size_bytes for d in used)
    return TenantPlan(
        tenant.id,
        tenant.name,
        "already enqueued tonight",
        job_datasets,
        0,
        sum(d.example_count for d in used),
        size,
        estimate_tokens(size, params),
        params,
        version.version if version else None,
        job_id=job.id,
    )


def plan_nightly(
    *,
    session: Session,
    run_date: date,
    since: datetime | None = None,
    limit: int | None = None,
    validation_split: float = 0.1,
    defaults: dict[str, Any] | None = None,
    batch_size: int = PLANNING_BATCH_SIZE,
) -> NightlyPlan:
    """Which tenants get a nightly job on ``run_date`` and what it trains (module
    docstring). Reads only: the tenants page by page, ``batch_size`` at a time, each page
    in a fixed number of queries (so 100,000 tenants take 100 pages, not 100,000 queries)."""
    if limit is not None and limit < 0:
        raise InvalidInputError(f"limit must be at least 0, got {limit}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    key = crud.nightly_idempotency_key(run_date)
    planning = _Planning(run_date, since, validation_split, defaults)
    last: uuid.UUID | None = None
    while True:
        tenants = crud.tenant_page(session=session, after=last, limit=batch_size)
        if tenants:
            planning.add_batch(session, tenants)
            last = tenants[-1].id
        if len(tenants) < batch_size:
            break

    def in_order(entries: list[tuple[Any, Any]]) -> list[Any]:
        return [item for _, item in sorted(entries, key=lambda entry: entry[0])]

    existing: list[TenantPlan] = in_order(planning.existing)
    skipped: list[SkippedTenant] = in_order(planning.skipped)
    room = None if limit is None else max(limit - len(existing), 0)
    planned: list[TenantPlan] = in_order(planning.candidates)
    if room is not None and len(planned) > room:
        for plan in planned[room:]:
            skipped.append(
                SkippedTenant(plan.tenant_id, plan.tenant_name, f"over the limit of {limit}")
            )
        planned = planned[:room]
    return NightlyPlan(run_date, key, since, existing + planned, skipped)


def enqueue_plan(
    *,
    session: Session,
    plan: NightlyPlan,
    max_attempts: int = 3,
    max_steps: int | None = None,
    batch_size: int = PLANNING_BATCH_SIZE,
) -> NightlyPlan:
    """Enqueue each planned tenant's job (``batch``, key ``nightly-<date>``, marked with the
    night), ``batch_size`` jobs per transaction and INSERT. A tenant that can no longer take
    one (deleted meanwhile, a dataset gone, more steps than ``max_steps``) moves to
    ``skipped`` with the reason. Returns the plan with every job id; ``created`` tells which
    jobs are new."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    pending = [item for item in plan.tenants if item.job_id is None]
    outcomes: dict[uuid.UUID, crud.NightlyJobResult] = {}
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        requests = [
            crud.NightlyJobRequest(item.tenant_id, item.dataset_ids, item.hyperparameters)
            for item in chunk
        ]
        try:
            results = crud.enqueue_nightly_jobs(
                session=session,
                run_date=plan.run_date,
                requests=requests,
                max_attempts=max_attempts,
                max_steps=max_steps,
            )
        except IntegrityError:
            # A tenant row went away between the checks and the INSERT (an erasure): this
            # batch goes one job at a time, so only that tenant is refused.
            results = [
                _enqueue_one(session, plan, item, max_attempts=max_attempts, max_steps=max_steps)
                for item in chunk
            ]
        outcomes.update((result.tenant_id, result) for result in results)

    tenants: list[TenantPlan] = []
    skipped = list(plan.skipped)
    for item in plan.tenants:
        if item.job_id is not None:
            tenants.append(item)
            continue
        outcome = outcomes[item.tenant_id]
        if outcome.job_id is None:
            reason = f"not enqueued: {outcome.error}"
            skipped.append(SkippedTenant(item.tenant_id, item.tenant_name, reason))
            continue
        tenants.append(replace(item, job_id=outcome.job_id, created=outcome.created))
    return replace(plan, tenants=tenants, skipped=skipped)


def _enqueue_one(
    session: Session,
    plan: NightlyPlan,
    item: TenantPlan,
    *,
    max_attempts: int,
    max_steps: int | None,
) -> crud.NightlyJobResult:
    try:
        job, created = crud.enqueue_job(
            session=session,
            tenant_id=item.tenant_id,
            job_in=TrainingJobCreate(
                dataset_ids=item.dataset_ids,
                hyperparameters=item.hyperparameters,
                priority=JobPriority.batch,
                idempotency_key=plan.idempotency_key,
                max_attempts=max_attempts,
                nightly_run_date=plan.run_date,
            ),
            max_steps=max_steps,
        )
    except (PrefixdError, ValidationError) as error:  # ValidationError: > 1000 datasets
        return crud.NightlyJobResult(item.tenant_id, error=str(error).splitlines()[0])
    if job.nightly_run_date != plan.run_date:
        # A job of the tenant's own took the key before the key space was reserved
        # (migration 0005): it is not tonight's nightly job, and the night does not count it.
        held = f"the tenant's own job {job.id} holds {plan.idempotency_key!r}"
        return crud.NightlyJobResult(item.tenant_id, error=held)
    return crud.NightlyJobResult(item.tenant_id, job.id, created)


# --- a whole pass, with its record ----------------------------------------------------------


@dataclass(frozen=True)
class NightlyOutcome:
    plan: NightlyPlan
    run: NightlyRun | None  # None for a dry run
    seconds: float


def _log_finished(runs: Sequence[NightlyRun]) -> None:
    for run in runs:
        if run.finished_at is not None:
            log.info(
                "nightly %s finished: %d job(s), %d succeeded (%d kept inactive by the quality "
                "gate), %d failed, %d cancelled, %d tenant(s) skipped; wall %.0f s",
                run.run_date,
                run.tenants_planned,
                run.jobs_succeeded,
                run.prefixes_kept_inactive,
                run.jobs_failed,
                run.jobs_cancelled,
                run.tenants_skipped,
                run.wall_seconds or 0.0,
            )


def refresh_runs(engine: Engine) -> list[NightlyRun]:
    """Store the job counts of every night not finished yet; log the nights that are."""
    with session_scope(engine) as session:
        runs = crud.refresh_nightly_runs(session=session)
        for run in runs:
            session.expunge(run)
    _log_finished(runs)
    return runs


def run_nightly(
    engine: Engine,
    *,
    run_date: date,
    since: datetime | None = None,
    limit: int | None = None,
    validation_split: float = 0.1,
    defaults: dict[str, Any] | None = None,
    dry_run: bool = False,
    max_steps: int | None = None,
) -> NightlyOutcome:
    """One planning pass: plan, and unless ``dry_run`` enqueue and record it in
    ``nightly_runs`` (a dry run writes nothing). Logs one summary line."""
    started = _time.monotonic()

    def make_plan(session: Session) -> NightlyPlan:
        return plan_nightly(
            session=session,
            run_date=run_date,
            since=since,
            limit=limit,
            validation_split=validation_split,
            defaults=defaults,
        )

    if dry_run:
        with session_scope(engine) as session:
            plan = make_plan(session)
        return NightlyOutcome(plan, None, _time.monotonic() - started)
    refresh_runs(engine)
    with session_scope(engine) as session:
        crud.start_nightly_run(session=session, run_date=run_date)
        plan = make_plan(session)
        plan = enqueue_plan(session=session, plan=plan, max_steps=max_steps)
        run = crud.finish_nightly_planning(
            session=session,
            run_date=run_date,
            tenants_skipped=len(plan.skipped),
            estimated_tokens=plan.estimated_tokens,
        )
        session.expunge(run)
    seconds = _time.monotonic() - started
    log.info(
        "nightly %s: %d tenant(s) planned (%d new job(s), %d already enqueued), %d skipped, "
        "%d examples, ~%d tokens; planned in %.2f s",
        run_date,
        len(plan.tenants),
        plan.created,
        len(plan.tenants) - plan.created,
        len(plan.skipped),
        plan.examples,
        plan.estimated_tokens,
        seconds,
    )
    _log_finished([run])
    return NightlyOutcome(plan, run, seconds)


# --- the built-in schedule (prefixd worker --nightly-at HH:MM) ------------------------------


def parse_time_of_day(text: str) -> time:
    try:
        hours, minutes = text.strip().split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise InvalidInputError(
            f"invalid time of day {text!r}: expected HH:MM, e.g. 02:00"
        ) from None


class NightlySchedule:
    """When the planner is due, in local time: at ``at`` every day. A schedule made after
    today's ``at`` is due at once (a worker started or restarted after the hour runs
    tonight's pass — which plans nothing new if one ran already)."""

    def __init__(self, at: time, now: datetime) -> None:
        self.at = at
        self.next_due = datetime.combine(now.date(), at)

    def due(self, now: datetime) -> date | None:
        """The night to plan when due (then the next is tomorrow at ``at``), else None."""
        if now < self.next_due:
            return None
        self.next_due = datetime.combine(now.date() + timedelta(days=1), self.at)
        return now.date()


class NightlyRunner:
    """The nightly planner inside ``prefixd worker --nightly-at HH:MM``: :meth:`poll` (from
    the worker's loop) runs :func:`run_nightly` when the schedule is due, and otherwise
    stores the nightly runs' job counts every ``refresh_seconds``. Errors are logged and
    reported, never raised: a planning pass that failed is retried a minute later."""

    def __init__(
        self,
        engine: Engine,
        at: time,
        *,
        validation_split: float,
        now: datetime | None = None,
        refresh_seconds: float = 60.0,
        max_steps: int | None = None,
    ) -> None:
        self.engine = engine
        self.validation_split = validation_split
        self.max_steps = max_steps
        self.schedule = NightlySchedule(at, now or datetime.now())
        self.refresh_seconds = refresh_seconds
        self._last_refresh = _time.monotonic()

    def poll(self, now: datetime) -> list[str]:
        """Lines to print (a pass ran, a night finished, something failed)."""
        night = self.schedule.due(now)
        try:
            if night is not None:
                outcome = run_nightly(
                    self.engine,
                    run_date=night,
                    validation_split=self.validation_split,
                    max_steps=self.max_steps,
                )
                self._last_refresh = _time.monotonic()
                plan = outcome.plan
                return [
                    f"nightly {night}: {len(plan.tenants)} tenant(s) planned, {plan.created} "
                    f"new job(s), {len(plan.skipped)} skipped, ~{plan.estimated_tokens} tokens"
                ]
            if _time.monotonic() - self._last_refresh < self.refresh_seconds:
                return []
            self._last_refresh = _time.monotonic()
            return [
                f"nightly {run.run_date} finished: {run.jobs_succeeded} succeeded "
                f"({run.prefixes_kept_inactive} kept inactive by the quality gate), "
                f"{run.jobs_failed} failed, {run.jobs_cancelled} cancelled in "
                f"{run.wall_seconds or 0.0:.0f} s"
                for run in refresh_runs(self.engine)
                if run.finished_at is not None
            ]
        except Exception as error:  # the database hiccuped: try again later
            log.exception("nightly planner failed")
            if night is not None:
                self.schedule.next_due = now + timedelta(minutes=1)
                return [f"nightly {night}: planning failed ({error}); retrying in a minute"]
            return []
