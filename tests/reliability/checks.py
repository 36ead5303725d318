"""What must hold after every fault, read from the database and the bucket (never from
logs): no job lost (each reached a final state), none duplicated (a succeeded job published
exactly one version, a failed one none), and no half-written version (every prefix row has
its complete blob, every prefix blob its row, one active version per tenant)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from common.blobstore import BlobStore, prefixes_key_prefix
from common.db.models import TERMINAL_JOB_STATES, JobState, PrefixVersion, TrainingJob


def jobs_by_id(engine: Engine, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, TrainingJob]:
    with Session(engine) as session:
        rows = session.exec(select(TrainingJob).where(col(TrainingJob.id).in_(list(job_ids))))
        found = {job.id: job for job in rows.all()}
        for job in found.values():
            session.expunge(job)
    return found


def describe(job: TrainingJob) -> str:
    return (
        f"job {job.id} (tenant {job.tenant_id}): {job.state.value}, attempt "
        f"{job.attempts}/{job.max_attempts}, error {job.error!r}"
    )


def assert_nothing_lost_or_duplicated(
    engine: Engine,
    store: BlobStore,
    job_ids: Iterable[uuid.UUID],
    *,
    expect: JobState | None = JobState.succeeded,
) -> dict[uuid.UUID, TrainingJob]:
    """Check the jobs and their tenants' prefix versions; returns the jobs' rows."""
    job_ids = list(job_ids)
    jobs = jobs_by_id(engine, job_ids)
    lost = [str(j) for j in job_ids if j not in jobs]
    assert not lost, f"job rows disappeared: {lost}"
    unfinished = [describe(j) for j in jobs.values() if j.state not in TERMINAL_JOB_STATES]
    assert not unfinished, f"jobs left unfinished: {unfinished}"
    if expect is not None:
        wrong = [describe(j) for j in jobs.values() if j.state != expect]
        assert not wrong, f"jobs that did not end {expect.value}: {wrong}"
    over = [describe(j) for j in jobs.values() if j.attempts > j.max_attempts]
    assert not over, f"jobs that ran more attempts than allowed: {over}"

    tenants = {j.tenant_id for j in jobs.values()}
    with Session(engine) as session:
        prefixes = session.exec(
            select(PrefixVersion).where(col(PrefixVersion.tenant_id).in_(list(tenants)))
        ).all()
        for row in prefixes:
            session.expunge(row)
    for job in jobs.values():
        published = [p for p in prefixes if p.job_id == job.id]
        want = 1 if job.state == JobState.succeeded else 0
        assert len(published) == want, (
            f"{describe(job)} published {len(published)} prefix version(s), expected {want}: "
            f"{[(p.version, str(p.id)) for p in published]}"
        )
    for tenant_id in tenants:
        rows = sorted((p for p in prefixes if p.tenant_id == tenant_id), key=lambda p: p.version)
        versions = [p.version for p in rows]
        assert versions == list(range(1, len(rows) + 1)), (
            f"tenant {tenant_id}: prefix versions {versions} have gaps or repeats"
        )
        active = [p.version for p in rows if p.active]
        assert len(active) <= 1, f"tenant {tenant_id}: several active versions {active}"
        if rows:
            assert active == [versions[-1]], (
                f"tenant {tenant_id}: active version {active}, expected the newest {versions[-1]}"
            )
        assert_blobs_match_rows(store, tenant_id, rows)
    return jobs


def assert_blobs_match_rows(store: BlobStore, tenant_id: uuid.UUID, rows: list[Any]) -> None:
    """Every prefix row's blob is there and complete (size, SHA-256 checked on read); no
    prefix blob without a row (an unpublished attempt's leftover)."""
    blobs = {b.key: b for b in store.list_objects(prefixes_key_prefix(tenant_id))}
    keys = {p.object_key for p in rows}
    missing = sorted(keys - set(blobs))
    assert not missing, f"tenant {tenant_id}: prefix rows point at missing blobs {missing}"
    orphans = sorted(set(blobs) - keys)
    assert not orphans, f"tenant {tenant_id}: prefix blobs without a row {orphans}"
    for row in rows:
        data = store.get_bytes(row.object_key)  # raises when its SHA-256 does not match
        assert len(data) == row.size_bytes, (
            f"prefix {row.id}: blob of {len(data)} bytes, row says {row.size_bytes}"
        )
