"""A trainer entry for the isolation test (tests/workers/test_trainer_pool.py): it runs the
real job (:func:`workers.trainer_pool.run_claimed_job`) in the pool's process, and looks for
tenants' data in that process before and after.

It leaves its own job's data behind on purpose — the examples the trainer read stay
referenced from this module's state, as a leak in the trainer would keep them — so a
process that ran a job and were then given another would show the first job's data to the
second: in :data:`LEFT_BEHIND` and among the objects the garbage collector reaches.
Tenants' data is recognised by the canary tokens the test puts in each tenant's examples.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import asdict
from typing import Any

from common.config import Settings
from common.data import Example
from common.shared_weights import SharedModel
from workers.trainer import PreparedTrainer

CANARY = re.compile(r"isolation-canary-[0-9a-f]{32}")

# In the trainer process: the examples of every job this process ran (the deliberate leak).
LEFT_BEHIND: list[Any] = []


def canary(tenant_hex: str) -> str:
    return f"isolation-canary-{tenant_hex}"


def canaries_in_process() -> dict[str, list[str]]:
    """Canary tokens reachable in this process: from this module's state, and from every
    example object the garbage collector tracks."""
    in_state = {
        token
        for batch in LEFT_BEHIND
        for example in batch
        for token in CANARY.findall(f"{example.input} {example.output}")
    }
    gc.collect()
    in_objects = {
        token
        for obj in gc.get_objects()
        if isinstance(obj, Example)
        for token in CANARY.findall(f"{obj.input} {obj.output}")
    }
    return {"module_state": sorted(in_state), "gc": sorted(in_objects)}


def probing_job(
    settings: Settings,
    shared: SharedModel,
    job_id: str,
    owner: str,
    scheduler: Any,
    prepared: PreparedTrainer | None,
) -> dict[str, Any]:
    import workers.trainer as trainer
    from workers.trainer_pool import run_claimed_job

    before = canaries_in_process()
    real_job_examples = trainer.job_examples

    def job_examples_kept(*args: Any, **kwargs: Any) -> Any:
        train, validation = real_job_examples(*args, **kwargs)
        LEFT_BEHIND.append([*train, *(validation or [])])
        return train, validation

    trainer.job_examples = job_examples_kept  # type: ignore[assignment]
    report = run_claimed_job(settings, shared, job_id, owner, scheduler, prepared)
    return {
        "pid": os.getpid(),
        "report": asdict(report),
        "before": before,
        "after": canaries_in_process(),
    }
