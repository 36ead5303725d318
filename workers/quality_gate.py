"""The nightly quality gate: a prefix retrained by a nightly (``batch``) job becomes the
tenant's active version only if it is not worse than the active version on the same
held-out examples.

The trainer calls :func:`nightly_quality_gate` after training, before writing the blob:

1. no active version, or one trained for another base model, or one whose blob cannot be
   read: nothing to compare with — the new version is activated (``quality_gate`` metric
   says why);
2. the comparison slice is the job's held-out validation examples *that the active version
   did not train on*: examples of datasets its job did not read, plus — when its job used
   the same stable ``hash`` split (seed and fraction) — the examples that split held out
   for it too. An example the active version trained on would favour it unfairly. When the
   active version's job is unknown the whole held-out slice is used; when no example is
   left the versions are not compared and the new one is activated;
3. both prefixes (as stored: after the cast to the stored dtype) are evaluated with the same
   frozen model, loss on output tokens, mean per token (:func:`common.training.evaluate_loss`);
4. the new version is activated iff ``new <= active * (1 + max_regression)``
   (``PREFIXD_NIGHTLY_MAX_REGRESSION``); else it is published inactive and the job gets a
   ``note`` saying why (it still ``succeeded``; the tenant may activate the version itself).

Every outcome adds flat ``quality_gate*`` entries to the new prefix's metrics. Known limit:
early stopping picks the new version's best epoch on the same held-out slice, a slight bias
in its favour.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.engine import Engine

from common.architectures import is_encoder_decoder, max_positions, prefix_shape
from common.blobstore import BlobNotFoundError, BlobStore
from common.data import EncodedExample, Example, encode_example
from common.db import crud
from common.db.engine import session_scope
from common.db.errors import NotFoundError
from common.db.models import TrainingJob
from common.errors import IncompatiblePrefixError, InvalidInputError
from common.model_loading import LoadedModel
from common.prefix_file import Prefix, prefix_from_bytes
from common.training import evaluate_loss
from common.training_budget import HASH_SPLIT

log = logging.getLogger(__name__)


def hash_fraction(example: Example, seed: int) -> float:
    """A stable number in [0, 1) for an example: the hash split holds it out when this is
    below the validation fraction."""
    digest = hashlib.sha256(f"{seed}\0{example.input}\0{example.output}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: an example is held out iff ``hash_fraction < fraction``, so
    it stays on its side as data is added. At least one example lands on each side (the
    lowest-hash example is held out if none is; the highest trains if all are held out);
    needs two examples."""
    if len(examples) < 2:
        raise InvalidInputError(
            f"validation_split {fraction} of {len(examples)} example(s) leaves nothing to train on"
        )
    scores = [hash_fraction(e, seed) for e in examples]
    held = [s < fraction for s in scores]
    if not any(held):
        held[scores.index(min(scores))] = True
    if all(held):
        held[scores.index(max(scores))] = False
    train = [e for e, h in zip(examples, held, strict=True) if not h]
    held_out = [e for e, h in zip(examples, held, strict=True) if h]
    return train, held_out


@dataclass(frozen=True)
class GateDecision:
    activate: bool
    note: str | None = None  # why the version was kept inactive
    metrics: dict[str, Any] = field(default_factory=dict)


def _not_compared(reason: str, **extra: Any) -> GateDecision:
    return GateDecision(True, None, {"quality_gate": reason, **extra})


def comparison_slice(
    held_out: Sequence[Example],
    active_job: TrainingJob | None,
    active_job_examples: Sequence[Example] | None,
) -> tuple[list[Example], str]:
    """The held-out examples the active version did not train on, and how they were
    chosen. ``active_job_examples``: the current examples of the datasets the active
    version's job read (None when that job is unknown)."""
    if active_job is None or active_job_examples is None:
        return list(held_out), "whole_slice"
    seen = set(active_job_examples)
    params = active_job.hyperparameters or {}
    if params.get("validation_split_method") == HASH_SPLIT:
        fraction = float(params.get("validation_split") or 0.0)
        seed = int(params.get("seed", 0))
        seen = {e for e in seen if hash_fraction(e, seed) >= fraction}
    return [e for e in held_out if e not in seen], "unseen_by_active"


def evaluate_prefix(
    loaded: LoadedModel, key_values: torch.Tensor, encoded: Sequence[EncodedExample], batch: int
) -> float:
    model = loaded.model
    dtype = next(model.parameters()).dtype
    pad = loaded.tokenizer.pad_token_id
    return evaluate_loss(
        model,
        key_values.to(dtype),
        encoded,
        batch_size=batch,
        pad_id=int(pad if pad is not None else 0),
    )


def compare(
    loaded: LoadedModel,
    candidate: Prefix,
    active: Prefix,
    examples: Sequence[Example],
    *,
    max_regression: float,
    batch_size: int,
) -> tuple[bool, float, float, int]:
    """``(passed, candidate_loss, active_loss, examples_used)`` on the examples that fit
    the context behind both prefixes."""
    config = loaded.model.config
    limit = max_positions(config) - max(candidate.prefix_length, active.prefix_length)
    two_sided = is_encoder_decoder(config)

    def fits(item: EncodedExample) -> bool:
        # Encoder-decoder: each side holds its own prefix, so each side must fit.
        return (item.longest_side if two_sided else len(item)) <= limit

    encoded = [
        item
        for e in examples
        if fits(item := encode_example(loaded.tokenizer, e, encoder_decoder=two_sided))
    ]
    if not encoded:
        return True, float("nan"), float("nan"), 0
    new_loss = evaluate_prefix(loaded, candidate.key_values, encoded, batch_size)
    old_loss = evaluate_prefix(loaded, active.key_values, encoded, batch_size)
    return new_loss <= old_loss * (1.0 + max_regression), new_loss, old_loss, len(encoded)


def nightly_quality_gate(
    engine: Engine,
    store: BlobStore,
    loaded: LoadedModel,
    job: TrainingJob,
    candidate: Prefix,
    held_out: Sequence[Example] | None,
    *,
    max_regression: float,
    batch_size: int,
    load_examples: Any,
    served: Any = None,
) -> GateDecision:
    """Decide whether the nightly job's new prefix becomes active (module docstring).
    ``load_examples(dataset_ids)`` reads datasets of the job's tenant (the trainer's
    loader)."""
    if not held_out:
        return _not_compared("no_validation_examples")
    assert job.tenant_id is not None  # nightly jobs are tenants' jobs
    with session_scope(engine) as session:
        active = crud.get_active_prefix(session=session, tenant_id=job.tenant_id)
        active_job = (
            crud.get_job(session=session, job_id=active.job_id)
            if active is not None and active.job_id is not None
            else None
        )
        if active is not None:
            session.expunge(active)
        if active_job is not None:
            session.expunge(active_job)
    if active is None:
        return _not_compared("no_active_version")
    if active.base_model_fingerprint != loaded.fingerprint:
        return _not_compared(
            "active_version_for_another_model", quality_gate_active_version=active.version
        )
    try:
        active_prefix = prefix_from_bytes(
            store.get_bytes(active.object_key),
            source=f"active prefix version {active.version}",
            expected_fingerprint=loaded.fingerprint,
            expected_shape=prefix_shape(loaded.model.config),
        )
        if served is not None:  # a stacked version is compared as served: behind its base
            active_prefix = served(active_prefix)
    except (BlobNotFoundError, IncompatiblePrefixError, NotFoundError, InvalidInputError) as error:
        log.warning("job %s: quality gate cannot read the active prefix: %s", job.id, error)
        return _not_compared(
            "active_version_unreadable", quality_gate_active_version=active.version
        )

    active_examples: list[Example] | None = None
    if active_job is not None:
        wanted = set(job.dataset_ids)  # datasets of the active job that still exist
        ids = [uuid.UUID(str(d)) for d in active_job.dataset_ids if str(d) in wanted]
        active_examples = load_examples(ids) if ids else []
    examples, basis = comparison_slice(held_out, active_job, active_examples)
    base = {"quality_gate_active_version": active.version, "quality_gate_basis": basis}
    if not examples:
        return _not_compared("no_held_out_example_unseen_by_active", **base)
    passed, new_loss, old_loss, used = compare(
        loaded,
        candidate,
        active_prefix,
        examples,
        max_regression=max_regression,
        batch_size=batch_size,
    )
    if used == 0:
        return _not_compared("no_example_fits_both_prefixes", **base)
    metrics = base | {
        "quality_gate": "passed" if passed else "kept_inactive",
        "quality_gate_validation_loss": new_loss,
        "quality_gate_active_validation_loss": old_loss,
        "quality_gate_examples": used,
        "quality_gate_max_regression": max_regression,
    }
    if passed:
        return GateDecision(True, None, metrics)
    change = new_loss / old_loss - 1.0 if old_loss > 0 else float("inf")
    note = (
        f"kept inactive by the nightly quality gate: validation loss {new_loss:.4f} is "
        f"{change:+.1%} against active version {active.version}'s {old_loss:.4f} on the same "
        f"{used} held-out example(s), beyond nightly_max_regression {max_regression:.1%}; "
        "the new version was published inactive (activate it to override)"
    )
    return GateDecision(False, note, metrics)
