"""The trainer: one training job in a Ray worker process of its own.

    prepared = prepare_trainer(settings, shared)          # before the claim: no job data
    report = run_training_job(settings, shared, job_id, owner, prepared=prepared)

The scheduler claims the job (holding the lease as ``owner``) and hands it to a trainer
process of :mod:`workers.trainer_pool`: a process that runs this one job and is then killed
(nothing of the job stays behind for another), usually started and prepared
(:func:`prepare_trainer`: torch's threads, a database engine, the store's client, the frozen
weights mapped) before the claim; a retry is a new claim with a new owner, in another
process. The trainer:

1. renews the lease every ``job_heartbeat_seconds`` from a thread (the first renewal
   replaces the start-up lease with ``job_lease_seconds``); a failed renewal (cancelled,
   reclaimed, erased) stops training between two steps, without publishing;
2. validates the hyperparameters (:mod:`common.hyperparameters`) and reads the job's
   datasets — looked up with the job's tenant id — into memory, never to disk;
3. trains on the frozen weights mapped zero-copy (:func:`materialize_model`, at the
   process's preparation), writing progress events at most every
   ``progress_event_seconds``;
4. for a nightly (``batch``) job, runs the quality gate (:mod:`workers.quality_gate`);
5. writes the prefix blob under a fresh id, then :func:`crud.publish_prefix` (tenant still
   active, lease still ours, version activated or kept inactive by the gate, job
   succeeded). If publishing fails the blob is deleted — unless the commit's outcome is
   unknown (then the tenant's next attempt sweeps it if no row points at it).

User errors (bad hyperparameters, bad data, a dataset that is gone) fail the job with the
message and no retry; anything else fails the attempt with a retry while attempts remain.

Budget: a job whose steps (epochs x batches per epoch) exceed ``job_max_steps`` fails
without retry before training; an attempt still training after ``job_max_runtime_seconds``
stops between two steps and fails the job without retry (the scheduler force-stops one that
does not). Running out of memory (``torch.OutOfMemoryError``, ``MemoryError``) fails the job
without retry, with a message suggesting half the batch size: retrying the same batch would
run out again.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from common.architectures import prefix_shape
from common.base_prefix import inference_prefix
from common.blob_deletes import delete_orphan_prefix_blobs
from common.blobstore import BlobNotFoundError, BlobStore, build_blob_store
from common.blobstore.base import sha256_hex
from common.blobstore.keys import (
    OPERATOR_ROOT,
    base_prefix_key,
    key_belongs_to_tenant,
    prefix_key,
)
from common.config import Settings
from common.data import Example, parse_jsonl
from common.db import crud
from common.db.crud.prefixes import NO_EXPECTATION, NoExpectation
from common.db.engine import create_db_engine, session_scope
from common.db.errors import ConflictError, LeaseLostError, NotFoundError, TenantNotActiveError
from common.db.models import (
    BasePrefix,
    BasePrefixCreate,
    JobEventCreate,
    JobPriority,
    JobState,
    PrefixVersion,
    PrefixVersionCreate,
    TrainingJob,
)
from common.devices import choose_placement, place
from common.errors import IncompatiblePrefixError, InvalidInputError
from common.hyperparameters import JobTrainingSpec, parse_hyperparameters
from common.model_loading import LoadedModel
from common.prefix_file import Prefix, prefix_from_bytes, prefix_to_bytes
from common.shared_weights import SharedModel, materialize_model
from common.training import Progress, train_prefix
from common.training_budget import HASH_SPLIT, automatic_validation_split, plan_budget
from workers.job_report import Candidate, bare_model, json_safe, personalization_report
from workers.quality_gate import GateDecision, hash_split, nightly_quality_gate
from workers.trainer_report import Outcome, TrainerReport

log = logging.getLogger(__name__)

# Errors a retry cannot fix: the job fails at once with the message.
USER_ERRORS: tuple[type[Exception], ...] = (
    InvalidInputError,
    NotFoundError,
    BlobNotFoundError,
    IncompatiblePrefixError,
)
_PUBLISH_TRIES = 3


class PhaseTimes:
    """Seconds a job spent in each phase, in its report: ``prepare`` (a process started
    for the job: imports, connections, the model mapped), ``lease`` (the first heartbeat),
    ``read`` (job row, orphan sweep, datasets), ``train``, ``evaluate`` (the
    personalization report), ``gate`` (nightly jobs), ``publish``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (now - self._last)
        self._last = now


@dataclass(frozen=True)
class PreparedTrainer:
    """What a trainer process sets up before it is given a job (:func:`prepare_trainer`):
    a database engine, the blob store's client and the frozen model mapped and placed —
    nothing of any job or tenant."""

    engine: Engine
    store: BlobStore
    loaded: LoadedModel


def prepare_trainer(settings: Settings, shared: SharedModel) -> PreparedTrainer:
    """Everything a job needs that is not the job's: torch's threads, a database engine
    (connected once, so the job does not pay for it; a failure to connect is left to the
    job), the store's client, and the frozen weights mapped zero-copy and placed on this
    process's device. A warm trainer process runs this before any job is claimed for it."""
    import torch

    torch.set_num_threads(max(1, int(settings.trainer_num_cpus)))
    # A session idle inside a transaction for a lease is ended by the server: a trainer
    # frozen mid-transaction must not keep its job row locked past the lease it lost.
    engine = create_db_engine(
        settings,
        pool_size=2,
        max_overflow=2,
        idle_in_transaction_timeout_s=settings.job_lease_seconds,
    )
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:  # the job connects (and fails its attempt) itself
        log.warning("trainer could not connect to the database ahead of its job: %s", error)
    store = build_blob_store(settings)
    loaded = place(materialize_model(shared), choose_placement(settings.trainer_num_gpus))
    return PreparedTrainer(engine, store, loaded)


class LeaseKeeper:
    """Renews the job's lease from a background thread; ``lost`` is set once a renewal
    says the lease is gone (cancelled, reclaimed, erased)."""

    def __init__(
        self, engine: Engine, job_id: uuid.UUID, owner: str, *, lease_seconds: float, every: float
    ) -> None:
        self.engine, self.job_id, self.owner = engine, job_id, owner
        self.lease_seconds, self.every = lease_seconds, every
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def renew(self) -> bool:
        try:
            with session_scope(self.engine) as session:
                held = crud.heartbeat_job(
                    session=session,
                    job_id=self.job_id,
                    owner=self.owner,
                    lease_seconds=self.lease_seconds,
                )
        except SQLAlchemyError as error:  # the database decides once the lease runs out
            log.warning("heartbeat of job %s failed: %s", self.job_id, error)
            return True
        if not held:
            self.lost.set()
        return held

    def start(self) -> bool:
        held = self.renew()
        if held:
            self._thread.start()
        return held

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if not self.renew():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


class ProgressWriter:
    """``on_progress`` for the training loop: a job event on the first step, then at most
    one every ``every`` seconds, and on the last step. An event carries the newest
    validation loss computed since the previous event."""

    def __init__(self, engine: Engine, job_id: uuid.UUID, *, every: float) -> None:
        self.engine, self.job_id, self.every = engine, job_id, every
        self._last_time = -math.inf
        self.last_step = 0
        self._validation_loss: float | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.validation_loss is not None:
            self._validation_loss = progress.validation_loss
        now = time.monotonic()
        if (
            progress.step == 1
            or progress.step >= progress.total_steps
            or now - self._last_time >= self.every
        ):
            self.write(progress)
            self._last_time = now

    def finish(self, last: Progress | None) -> None:
        """Record the final step when training ended early (patience) between events."""
        if last is not None and last.step != self.last_step:
            self.write(last)

    def write(self, progress: Progress) -> None:
        event = JobEventCreate(
            step=progress.step,
            total_steps=progress.total_steps,
            loss=progress.loss,
            val_loss=self._validation_loss,
            tokens_per_second=max(progress.tokens_per_second, 0.0),
        )
        try:
            with session_scope(self.engine) as session:
                crud.record_job_event(session=session, job_id=self.job_id, event_in=event)
        except SQLAlchemyError as error:  # progress is informative; training goes on
            log.warning("progress event of job %s not written: %s", self.job_id, error)
            return
        self.last_step = progress.step
        self._validation_loss = None


def load_examples(
    engine: Engine, store: BlobStore, tenant_id: uuid.UUID, dataset_ids: list[Any]
) -> list[Example]:
    """Examples of the datasets, looked up with the job's tenant id: a dataset of another
    tenant is reported like a missing one and never read."""
    examples: list[Example] = []
    for raw_id in dataset_ids:
        dataset_id = uuid.UUID(str(raw_id))
        with session_scope(engine) as session:
            dataset = crud.get_dataset(session=session, tenant_id=tenant_id, dataset_id=dataset_id)
        if dataset is None:
            raise NotFoundError(f"dataset {dataset_id} of the job no longer exists")
        if not key_belongs_to_tenant(dataset.object_key, tenant_id):
            raise InvalidInputError(f"dataset {dataset_id} is stored outside its tenant's prefix")
        examples.extend(
            _stored_examples(store, dataset.object_key, dataset.sha256, f"dataset {dataset_id}")
        )
    return examples


def _stored_examples(store: BlobStore, key: str, sha256: str, what: str) -> list[Example]:
    """A dataset's examples, read into memory (never to disk) and checked against the SHA-256
    its row recorded."""
    try:
        data = store.get_bytes(key)
    except BlobNotFoundError:
        raise BlobNotFoundError(f"the data of {what} is missing from object storage") from None
    if sha256_hex(data) != sha256:
        raise InvalidInputError(f"{what}: the stored data does not match its recorded SHA-256")
    return parse_jsonl(data.splitlines(), source=what)


def load_operator_examples(
    engine: Engine, store: BlobStore, dataset_ids: list[Any]
) -> list[Example]:
    """Examples of operator datasets (an operator job's data: never a tenant's)."""
    examples: list[Example] = []
    for raw_id in dataset_ids:
        dataset_id = uuid.UUID(str(raw_id))
        with session_scope(engine) as session:
            dataset = crud.get_operator_dataset(session=session, dataset_id=dataset_id)
        if dataset is None:
            raise NotFoundError(f"operator dataset {dataset_id} of the job no longer exists")
        if not dataset.object_key.startswith(f"{OPERATOR_ROOT}datasets/"):
            raise InvalidInputError(f"operator dataset {dataset_id} is stored outside operator/")
        what = f"operator dataset {dataset_id}"
        examples.extend(_stored_examples(store, dataset.object_key, dataset.sha256, what))
    return examples


def job_examples(
    engine: Engine, store: BlobStore, job: TrainingJob, spec: JobTrainingSpec
) -> tuple[list[Example], list[Example] | None]:
    """The job's training and validation examples: validation from its
    ``validation_dataset_id``, or a seeded ``validation_split`` of the training data, or
    — neither given and ``epochs`` unset — the automatic split of
    :mod:`common.training_budget` (the same rule as ``prefixd train-local``), or none. An
    operator job (no tenant) reads operator datasets only; a tenant's job reads only that
    tenant's datasets."""

    def read(ids: list[Any]) -> list[Example]:
        if job.tenant_id is None:
            return load_operator_examples(engine, store, ids)
        return load_examples(engine, store, job.tenant_id, ids)

    train = read(list(job.dataset_ids))
    if job.validation_dataset_id is None:
        if spec.validation_split is None:
            if spec.config.epochs is None:
                return automatic_validation_split(train, spec.config.seed)
            return train, None
        return split_validation(
            train, spec.validation_split, spec.config.seed, method=spec.validation_split_method
        )
    if spec.validation_split:
        raise InvalidInputError(
            "give either validation_dataset_id or hyperparameters.validation_split, not both"
        )
    return train, read([job.validation_dataset_id])


def split_validation(
    examples: list[Example], fraction: float, seed: int, *, method: str = "shuffle"
) -> tuple[list[Example], list[Example] | None]:
    """``(train, validation)``: a seeded shuffle, or the stable ``hash`` split of
    :func:`workers.quality_gate.hash_split`; no validation when ``fraction`` is 0."""
    if fraction <= 0:
        return examples, None
    if method == HASH_SPLIT:
        return hash_split(examples, fraction, seed)
    held_out = max(1, round(len(examples) * fraction))
    if held_out >= len(examples):
        raise InvalidInputError(
            f"validation_split {fraction} of {len(examples)} example(s) leaves nothing to train on"
        )
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


def publish_trained_prefix(
    engine: Engine,
    store: BlobStore,
    *,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    owner: str,
    prefix: Prefix,
    activate: bool = True,
    note: str | None = None,
    expected_active_id: uuid.UUID | NoExpectation | None = NO_EXPECTATION,
    result: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Write the blob under a fresh prefix id, then publish it (one transaction), made
    active unless ``activate`` is False (then ``note`` says why, on the job) or the tenant's
    active version is no longer ``expected_active_id`` (compare-and-swap, see
    :func:`crud.publish_prefix`). If the publish fails — tenant gone or being deleted, lease
    lost, database down — the error is raised and the blob deleted again, except when the
    database cannot say whether the row was committed: then the blob is kept. Returns the new
    prefix id."""
    prefix_id = uuid.uuid4()
    key = prefix_key(tenant_id, prefix_id)
    data = prefix_to_bytes(prefix)
    info = store.put_bytes(key, data)
    prefix_in = PrefixVersionCreate(
        id=prefix_id,
        object_key=key,
        base_model_fingerprint=prefix.base_model_fingerprint,
        prefix_length=prefix.prefix_length,
        dtype=prefix.dtype_name,
        size_bytes=info.size,
        sha256=info.sha256 or sha256_hex(data),
        metrics=_json_safe(prefix.metrics),
        base_prefix_id=uuid.UUID(prefix.base_prefix_id) if prefix.base_prefix_id else None,
        base_mode=prefix.base_mode,
    )
    try:
        for attempt in range(1, _PUBLISH_TRIES + 1):
            try:
                with session_scope(engine) as session:
                    crud.publish_prefix(
                        session=session,
                        job_id=job_id,
                        owner=owner,
                        prefix_in=prefix_in,
                        activate=activate,
                        note=note,
                        expected_active_id=expected_active_id,
                        result=result,
                    )
                return prefix_id
            except (TenantNotActiveError, LeaseLostError):
                raise
            except ConflictError:  # a concurrent activation won the race: publish again
                if attempt == _PUBLISH_TRIES:
                    raise
    except BaseException as error:
        if (
            isinstance(error, SQLAlchemyError)
            and _prefix_row_exists(engine, prefix_id) is not False
        ):
            # The connection died around the commit (database restarted): the row may have
            # been committed and point at this blob, so deleting it could leave a visible
            # version without its data. Keep it; if no row exists, the next attempt's orphan
            # sweep (delete_orphan_prefix_blobs) removes it.
            log.warning(
                "publishing prefix %s of job %s: outcome unknown (%s); blob kept",
                prefix_id,
                job_id,
                type(error).__name__,
            )
            raise
        try:
            store.delete(key)
        except Exception as delete_error:  # the next job of the tenant sweeps it
            log.warning("could not delete unpublished prefix blob %s: %s", key, delete_error)
        raise
    raise AssertionError("unreachable")


def _prefix_row_exists(engine: Engine, prefix_id: uuid.UUID) -> bool | None:
    """Whether the prefix version's row exists; None when the database cannot say."""
    try:
        with session_scope(engine) as session:
            return session.get(PrefixVersion, prefix_id) is not None
    except SQLAlchemyError:
        return None


def _job_state(engine: Engine, job_id: uuid.UUID) -> JobState | None:
    with session_scope(engine) as session:
        job = crud.get_job(session=session, job_id=job_id)
        return None if job is None else job.state


def _lost_outcome(engine: Engine, job_id: uuid.UUID) -> str:
    """Why a lease is no longer ours, from the job's row."""
    try:
        state = _job_state(engine, job_id)
    except SQLAlchemyError:
        return Outcome.LEASE_LOST
    if state is None:
        return Outcome.ERASED
    if state == JobState.cancelled:
        return Outcome.CANCELLED
    return Outcome.LEASE_LOST


def _finish(
    engine: Engine, job_id: uuid.UUID, owner: str, state: JobState, error: str | None, retry: bool
) -> None:
    try:
        with session_scope(engine) as session:
            crud.finish_job(
                session=session, job_id=job_id, owner=owner, state=state, error=error, retry=retry
            )
    except SQLAlchemyError as db_error:  # the lease runs out and the job is retried
        log.warning("could not finish job %s: %s", job_id, db_error)


def _current_node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:
        pass
    return None


class _Flag:
    is_set = False

    def set_if(self, condition: bool) -> bool:
        self.is_set = self.is_set or condition
        return condition


class RuntimeLimitError(Exception):
    """The attempt trained past ``job_max_runtime_seconds`` (the job fails, no retry)."""

    def __init__(self, message: str, *, steps: dict[str, Any]) -> None:
        super().__init__(message)
        self.steps = steps  # how far it got, for the report


def out_of_memory_message(engine: Engine, job_id: uuid.UUID, error: BaseException) -> str:
    """Why the job failed for memory, with the batch size to try instead."""
    batch: int | None = None
    try:
        with session_scope(engine) as session:
            job = crud.get_job(session=session, job_id=job_id)
        if job is not None:
            batch = parse_hyperparameters(job.hyperparameters).config.batch_size
    except Exception:  # the message still says what happened
        pass
    advice = (
        f"resubmit with a smaller batch_size (e.g. {max(1, batch // 2)} instead of {batch})"
        if batch is not None
        else "resubmit with a smaller batch_size"
    )
    return (
        f"out of memory while training ({type(error).__name__}); not retried, as the same "
        f"batch would run out again: {advice}"
    )


def check_step_budget(
    train_examples: int,
    batch_size: int,
    epochs: int | None,
    max_steps: int,
    *,
    has_validation: bool = False,
) -> int:
    """The job's optimizer steps (``epochs`` None: the automatic budget,
    ``common/training_budget.py``); :class:`InvalidInputError` (no retry) beyond ``max_steps``."""
    budget = plan_budget(train_examples, batch_size, epochs=epochs, has_validation=has_validation)
    steps = budget.total_steps
    if steps > max_steps:
        raise InvalidInputError(
            f"the job needs {steps} optimizer steps ({steps // budget.steps_per_epoch} epoch(s) "
            f"x {budget.steps_per_epoch} batch(es) of {batch_size}), more than "
            f"job_max_steps ({max_steps}): use fewer epochs, a larger batch_size or less data"
        )
    return steps


def run_training_job(
    settings: Settings,
    shared: SharedModel,
    job_id: str,
    owner: str,
    *,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    prepared: PreparedTrainer | None = None,
) -> TrainerReport:
    """Run one claimed job to its end (see the module docstring). ``owner`` holds the
    lease; ``prepared``: what the process set up before the claim (:func:`prepare_trainer`;
    None: set up here, in the job's time). Returns a report; it raises only when it cannot
    even reach the database, and then the scheduler fails the attempt with a retry."""
    started = time.monotonic()
    job_uuid = uuid.UUID(job_id)
    info: dict[str, Any] = {
        "job_id": job_id,
        "owner": owner,
        "pid": os.getpid(),
        "node_id": _current_node_id(),
        "weights_object_id": shared.weights.hex(),
        "warm": prepared is not None,
    }
    if on_start is not None:
        on_start(dict(info))

    times = PhaseTimes()

    def report(outcome: str, **fields: Any) -> TrainerReport:
        return TrainerReport(
            outcome=outcome,
            seconds=time.monotonic() - started,
            phases={k: round(v, 4) for k, v in times.seconds.items()},
            **(info | fields),
        )

    import torch

    if prepared is None:
        prepared = prepare_trainer(settings, shared)
        times.lap("prepare")
    engine = prepared.engine
    lease = LeaseKeeper(
        engine,
        job_uuid,
        owner,
        lease_seconds=settings.job_lease_seconds,
        every=settings.job_heartbeat_seconds,
    )
    try:
        held = lease.start()
        times.lap("lease")
        if not held:
            return report(_lost_outcome(engine, job_uuid))
        try:
            return _train_and_publish(
                settings,
                prepared,
                job_uuid,
                owner,
                lease,
                report,
                deadline=started + settings.job_max_runtime_seconds,
                times=times,
            )
        except USER_ERRORS as error:
            _finish(engine, job_uuid, owner, JobState.failed, str(error), retry=False)
            return report(Outcome.FAILED, error=str(error))
        except (torch.OutOfMemoryError, MemoryError) as error:
            message = out_of_memory_message(engine, job_uuid, error)
            log.warning("job %s: %s", job_id, message)
            _finish(engine, job_uuid, owner, JobState.failed, message, retry=False)
            return report(Outcome.FAILED, error=message)
        except RuntimeLimitError as error:
            _finish(engine, job_uuid, owner, JobState.failed, str(error), retry=False)
            return report(Outcome.FAILED, error=str(error), **error.steps)
        except Exception as error:
            message = f"attempt failed: {type(error).__name__}: {error}"
            log.exception("job %s: %s", job_id, message)
            _finish(engine, job_uuid, owner, JobState.failed, message, retry=True)
            return report(Outcome.RETRYING, error=message)
    finally:
        lease.stop()
        engine.dispose()
        gc.collect()


def load_base_prefix(
    engine: Engine, store: BlobStore, loaded: Any, base_prefix_id: str
) -> tuple[BasePrefix, Prefix]:
    """A base prefix's row and file, checked (SHA-256 of the blob, the model's fingerprint
    and shape). Gone: :class:`NotFoundError` (a user error: the job fails, no retry)."""
    try:
        base_uuid = uuid.UUID(base_prefix_id)
    except ValueError:
        raise InvalidInputError(f"base_prefix {base_prefix_id!r} is not a base prefix id") from None
    with session_scope(engine) as session:
        row = crud.get_base_prefix(session=session, base_prefix_id=base_uuid)
        if row is not None:
            session.expunge(row)
    if row is None:
        raise NotFoundError(f"base prefix {base_prefix_id} no longer exists")
    try:
        data = store.get_bytes(row.object_key)
    except BlobNotFoundError:
        raise BlobNotFoundError(
            f"the file of base prefix {base_prefix_id} is missing from object storage"
        ) from None
    if sha256_hex(data) != row.sha256:
        raise InvalidInputError(
            f"base prefix {base_prefix_id}: the stored file does not match its SHA-256"
        )
    prefix = prefix_from_bytes(
        data,
        source=f"base prefix {base_prefix_id}",
        expected_fingerprint=loaded.fingerprint,
        expected_shape=prefix_shape(loaded.model.config),
    )
    return row, prefix


def served_prefix(engine: Engine, store: BlobStore, loaded: Any, prefix: Prefix) -> Prefix:
    """A stored version as it is served: a stacked one behind its base (which must still
    exist: else :class:`NotFoundError`), any other as it is."""
    base = None
    if prefix.base_mode == "stack" and prefix.base_prefix_id is not None:
        _, base = load_base_prefix(engine, store, loaded, prefix.base_prefix_id)
    return inference_prefix(prefix, base, base_prefix_id=prefix.base_prefix_id)


def previous_candidate(
    engine: Engine, store: BlobStore, loaded: Any, tenant_id: uuid.UUID
) -> Candidate | None:
    """The tenant's active version before this job, as served (stacked on its base when it
    is stacked); None when it has none. A version that cannot be served is reported as
    unavailable, with the reason, rather than measured without its base."""
    with session_scope(engine) as session:
        active = crud.get_active_prefix(session=session, tenant_id=tenant_id)
        if active is not None:
            session.expunge(active)
    if active is None:
        return None
    detail = {"prefix_id": str(active.id), "version": active.version}
    try:
        if active.base_model_fingerprint != loaded.fingerprint:
            raise IncompatiblePrefixError("it was trained for another base model")
        prefix = prefix_from_bytes(
            store.get_bytes(active.object_key),
            source=f"prefix version {active.version}",
            expected_fingerprint=loaded.fingerprint,
            expected_shape=prefix_shape(loaded.model.config),
        )
        served = served_prefix(engine, store, loaded, prefix)
    except (BlobNotFoundError, IncompatiblePrefixError, NotFoundError, InvalidInputError) as error:
        return Candidate("previous", None, detail, unavailable=str(error))
    return Candidate("previous", served.key_values, detail)


def _record_report(engine: Engine, job_id: uuid.UUID, last: Any, report: dict[str, Any]) -> None:
    """The personalization report as a job event (besides the job's ``result``)."""
    new = (report.get("against") or {}).get("new") or {}
    event = JobEventCreate(
        step=last.step if last is not None else 0,
        total_steps=last.total_steps if last is not None else None,
        val_loss=new.get("loss"),
        details={"evaluation": report},
    )
    try:
        with session_scope(engine) as session:
            crud.record_job_event(session=session, job_id=job_id, event_in=event)
    except SQLAlchemyError as error:  # informative; the result on the job is what counts
        log.warning("evaluation event of job %s not written: %s", job_id, error)


def publish_base_prefix(
    engine: Engine,
    store: BlobStore,
    *,
    job: TrainingJob,
    owner: str,
    prefix: Prefix,
    result: dict[str, Any],
) -> uuid.UUID:
    """Write the base prefix's blob under ``operator/base-prefixes/<new id>``, then publish
    it (one transaction, lease checked); the blob is deleted again when publishing fails."""
    assert job.base_prefix_name is not None
    base_id = uuid.uuid4()
    key = base_prefix_key(base_id)
    data = prefix_to_bytes(prefix)
    info = store.put_bytes(key, data)
    base_in = BasePrefixCreate(
        id=base_id,
        name=job.base_prefix_name,
        object_key=key,
        base_model_fingerprint=prefix.base_model_fingerprint,
        prefix_length=prefix.prefix_length,
        dtype=prefix.dtype_name,
        size_bytes=info.size,
        sha256=info.sha256 or sha256_hex(data),
        metrics=_json_safe(prefix.metrics),
    )
    try:
        with session_scope(engine) as session:
            crud.publish_base_prefix(
                session=session, job_id=job.id, owner=owner, base_in=base_in, result=result
            )
    except BaseException:
        try:
            store.delete(key)
        except Exception as delete_error:  # the next operator job sweeps it
            log.warning("could not delete unpublished base prefix blob %s: %s", key, delete_error)
        raise
    return base_id


def _train_and_publish(
    settings: Settings,
    prepared: PreparedTrainer,
    job_id: uuid.UUID,
    owner: str,
    lease: LeaseKeeper,
    report: Callable[..., TrainerReport],
    *,
    deadline: float = math.inf,
    times: PhaseTimes,
) -> TrainerReport:
    engine, store, loaded = prepared.engine, prepared.store, prepared.loaded
    with session_scope(engine) as session:
        job = crud.get_job(session=session, job_id=job_id)
    if job is None:
        return report(Outcome.ERASED)
    tenant_id = job.tenant_id
    # The active version when the job started: the new one replaces only that one
    # (compare-and-swap at publish), never a rollback or a version published meanwhile.
    expected_active_id: uuid.UUID | NoExpectation | None = NO_EXPECTATION  # operator job
    if tenant_id is not None:
        with session_scope(engine) as session:
            active_at_start = crud.get_active_prefix(session=session, tenant_id=tenant_id)
            expected_active_id = active_at_start.id if active_at_start is not None else None
    spec = parse_hyperparameters(job.hyperparameters)  # before any data or weights
    if tenant_id is None and spec.base_prefix is not None:
        raise InvalidInputError("a base prefix cannot itself be trained from a base prefix")
    delete_orphan_prefix_blobs(engine, store, tenant_id)
    train, validation = job_examples(engine, store, job, spec)
    check_step_budget(
        len(train),
        spec.config.batch_size,
        spec.config.epochs,
        settings.job_max_steps,
        has_validation=bool(validation),
    )
    times.lap("read")
    zero_copy = loaded.zero_copy
    base_row, base = None, None
    if spec.base_prefix is not None:
        base_row, base = load_base_prefix(engine, store, loaded, spec.base_prefix)
    progress = ProgressWriter(engine, job_id, every=settings.progress_event_seconds)
    out_of_time = _Flag()  # set when the runtime limit stopped training (not its end)
    result = train_prefix(
        loaded,
        train,
        spec.config,
        validation=validation,
        on_progress=progress,
        should_stop=lambda: lease.lost.is_set() or out_of_time.set_if(time.monotonic() > deadline),
        base=base.key_values if base is not None else None,
        base_mode=spec.base_mode,  # type: ignore[arg-type]
        base_prefix_id=str(base_row.id) if base_row is not None else None,
    )
    del train
    times.lap("train")
    last = result.history[-1] if result.history else None
    steps = {"steps": last.step if last else 0, "total_steps": last.total_steps if last else None}
    if lease.lost.is_set():  # cancelled, reclaimed or erased: nothing is published
        return report(_lost_outcome(engine, job_id), zero_copy=zero_copy, **steps)
    if out_of_time.is_set:
        raise RuntimeLimitError(
            f"the attempt trained past job_max_runtime_seconds "
            f"({settings.job_max_runtime_seconds:g} s) after {steps['steps']} of "
            f"{steps['total_steps']} steps and was stopped; not retried (ask for fewer "
            "epochs or less data)",
            steps=steps,
        )
    progress.finish(last)

    # What the new prefix bought, on the validation examples (workers/job_report.py).
    served = inference_prefix(result.prefix, base, base_prefix_id=result.prefix.base_prefix_id)
    candidates = [
        Candidate("new", served.key_values, {}),
        Candidate("bare_model", bare_model(loaded), {}),
    ]
    if base is not None and base_row is not None:
        detail = {
            "base_prefix_id": str(base_row.id),
            "name": base_row.name,
            "version": base_row.version,
            "base_mode": spec.base_mode,
        }
        candidates.append(Candidate("base", base.key_values, detail))
    if tenant_id is not None:
        previous = previous_candidate(engine, store, loaded, tenant_id)
        if previous is not None:
            candidates.append(previous)
    evaluation = json_safe(
        personalization_report(loaded, validation, candidates, batch_size=spec.config.batch_size)
    )
    _record_report(engine, job_id, last, evaluation)
    times.lap("evaluate")

    if tenant_id is None:  # an operator job: a new base prefix version
        try:
            base_id = publish_base_prefix(
                engine, store, job=job, owner=owner, prefix=result.prefix, result=evaluation
            )
        except LeaseLostError as error:
            return report(
                _lost_outcome(engine, job_id), error=str(error), zero_copy=zero_copy, **steps
            )
        except NotFoundError as error:
            return report(Outcome.ERASED, error=str(error), zero_copy=zero_copy, **steps)
        times.lap("publish")
        return report(Outcome.SUCCEEDED, prefix_id=str(base_id), zero_copy=zero_copy, **steps)

    gate = GateDecision(activate=True)
    if job.priority == JobPriority.batch:  # nightly: the quality gate decides activation
        gate = nightly_quality_gate(
            engine,
            store,
            loaded,
            job,
            served,
            validation,
            max_regression=settings.nightly_max_regression,
            batch_size=spec.config.batch_size,
            load_examples=lambda ids: load_examples(engine, store, tenant_id, ids),
            served=functools.partial(served_prefix, engine, store, loaded),
        )
        result.prefix.metrics.update(gate.metrics)
        log.info("job %s: quality gate %s", job_id, gate.metrics.get("quality_gate"))
        times.lap("gate")
    del validation, loaded
    try:
        prefix_id = publish_trained_prefix(
            engine,
            store,
            job_id=job_id,
            tenant_id=tenant_id,
            owner=owner,
            prefix=result.prefix,
            activate=gate.activate,
            note=gate.note,
            expected_active_id=expected_active_id,
            result=evaluation,
        )
    except TenantNotActiveError as error:
        _finish(engine, job_id, owner, JobState.cancelled, str(error), retry=False)
        return report(Outcome.ERASED, error=str(error), zero_copy=zero_copy, **steps)
    except LeaseLostError as error:
        return report(_lost_outcome(engine, job_id), error=str(error), zero_copy=zero_copy, **steps)
    except NotFoundError as error:  # the job or tenant row is gone: erased
        return report(Outcome.ERASED, error=str(error), zero_copy=zero_copy, **steps)
    times.lap("publish")
    return report(Outcome.SUCCEEDED, prefix_id=str(prefix_id), zero_copy=zero_copy, **steps)
