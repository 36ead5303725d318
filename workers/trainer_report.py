"""What a trainer process returns to the scheduler: a :class:`TrainerReport` (small; no
data, no tensors) with one :class:`Outcome`.

Apart from :mod:`workers.trainer` so that the scheduler, which reads reports and never
trains, does not import the training code and with it torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Outcome:
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a user error: the job failed for good
    RETRYING = "retrying"  # the attempt failed; the job is queued again (or failed when out)
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"  # the lease expired and the job went to someone else
    ERASED = "erased"  # the tenant (and the job with it) is being deleted or is gone


@dataclass(frozen=True)
class TrainerReport:
    """What a trainer returns to the scheduler (small; no data, no tensors)."""

    job_id: str
    owner: str
    outcome: str
    error: str | None = None
    pid: int = 0
    node_id: str | None = None
    weights_object_id: str | None = None
    zero_copy: bool | None = None
    steps: int = 0
    total_steps: int | None = None
    prefix_id: str | None = None
    seconds: float = 0.0
    warm: bool | None = None  # the process was started (and prepared) before the job's claim
    phases: dict[str, float] = field(default_factory=dict)  # seconds, see trainer.PhaseTimes
