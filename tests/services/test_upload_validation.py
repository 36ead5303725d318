"""Upload validation in processes of its own (issue 16): parsing and tokenizing a large
upload on the ingress replica held the GIL of the event loop that serves every tenant's
generate calls. The answers must be the ones in-process validation gave."""

from __future__ import annotations

import asyncio
import json
import os
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
    pid = asyncio.run(validator.run(os.getpid))
    assert pid != os.getpid()  # never on the replica's own interpreter
    # In Linux's idle scheduling class, so it yields busy cores to serving.
    if hasattr(os, "SCHED_IDLE"):
        assert asyncio.run(validator.run(os.sched_getscheduler, 0)) == os.SCHED_IDLE

    path = write(tmp_path, "good.jsonl", [good, good, good])
    assert asyncio.run(validator.count_examples(path, max_examples=5)) == 3

    bad = write(tmp_path, "bad.jsonl", [good, {"input": 1, "output": "x"}])
    with pytest.raises(InvalidInputError, match=r"^line 2: field 'input' must be a string"):
        asyncio.run(validator.count_examples(bad, max_examples=5))

    # The 413 comes back whole (status, code, message), not only its message.
    with pytest.raises(ApiError) as refused:
        asyncio.run(validator.count_examples(path, max_examples=2))
    assert (refused.value.status, refused.value.code) == (413, "payload_too_large")
    assert str(refused.value) == "line 3: more examples than max_dataset_examples (2)"
