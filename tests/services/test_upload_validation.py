"""Upload validation in processes of its own (issue 16): parsing and tokenizing a large
upload on the ingress replica held the GIL of the event loop that serves every tenant's
generate calls. The answers must be the ones in-process validation gave, and one tenant's
uploads never hold every process."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from common.config import Settings
from common.errors import InvalidInputError
from services.api.errors import ApiError
from services.api.upload_validation import UploadValidator


@pytest.fixture(scope="module")
def validator(tiny_model_dirs, tmp_path_factory):
    settings = Settings(
        home=tmp_path_factory.mktemp("validation-home"),
        model=str(tiny_model_dirs["llama"]),
        upload_validation_processes=1,
    )
    validator = UploadValidator(settings)
    yield validator
    validator.close()


def write(tmp_path: Path, name: str, lines: list[object]) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_validation_runs_in_another_process_with_the_same_answers(validator, tmp_path):
    good = {"input": "alpha beta", "output": "gamma"}
    pid = asyncio.run(validator.run(os.getpid, owner="t"))
    assert pid != os.getpid()  # never on the replica's own interpreter
    # In Linux's idle scheduling class, so it yields busy cores to serving.
    if hasattr(os, "SCHED_IDLE"):
        assert asyncio.run(validator.run(os.sched_getscheduler, 0, owner="t")) == os.SCHED_IDLE

    path = write(tmp_path, "good.jsonl", [good, good, good])
    assert asyncio.run(validator.count_examples(path, max_examples=5, owner="t")) == 3

    bad = write(tmp_path, "bad.jsonl", [good, {"input": 1, "output": "x"}])
    with pytest.raises(InvalidInputError, match=r"^line 2: field 'input' must be a string"):
        asyncio.run(validator.count_examples(bad, max_examples=5, owner="t"))

    # The 413 comes back whole (status, code, message), not only its message.
    with pytest.raises(ApiError) as refused:
        asyncio.run(validator.count_examples(path, max_examples=2, owner="t"))
    assert (refused.value.status, refused.value.code) == (413, "payload_too_large")
    assert str(refused.value) == "line 3: more examples than max_dataset_examples (2)"


def _hold_until(gate: str) -> int:
    """In a validation process: run until the file ``gate`` exists (the test's signal)."""
    deadline = time.monotonic() + 300
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def test_one_tenant_never_holds_every_validation_process(tiny_model_dirs, tmp_path):
    """Two processes; tenant a sends two uploads that run until released. Before, they took
    both processes and tenant b's upload waited for them; now a's second waits for its
    first, and b's runs at once on the other process."""
    settings = Settings(
        home=tmp_path / "home", model=str(tiny_model_dirs["llama"]), upload_validation_processes=2
    )
    validator = UploadValidator(settings)
    gate = tmp_path / "gate"

    async def scenario() -> tuple[int, list[int]]:
        first = asyncio.create_task(validator.run(_hold_until, str(gate), owner="a"))
        second = asyncio.create_task(validator.run(_hold_until, str(gate), owner="a"))
        other = await asyncio.wait_for(validator.run(os.getpid, owner="b"), timeout=120)
        assert not first.done() and not second.done()  # a's are still held
        gate.touch()
        return other, list(await asyncio.gather(first, second))

    try:
        assert validator.warm_up(timeout=120)
        other, (first, _) = asyncio.run(scenario())
    finally:
        gate.touch()
        validator.close()
    assert other != os.getpid() and first != other  # b's ran beside a's first, not after it
    assert validator.shares.owners() == 0  # nothing kept of owners that are done
