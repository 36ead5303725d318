"""Upload validation in processes of its own, off the ingress replica's interpreter.

Parsing and tokenizing every line of a large dataset is pure Python and holds the GIL: run
on the ingress replica (even on a thread of its own, even niced), it stalls the event loop
that serves every tenant's generate calls (measured: docs/BENCHMARKS.md, "Load: isolation").
So each API replica keeps a small pool of processes (``upload_validation_processes``),
started with ``spawn`` (never ``fork``: the replica is a multi-threaded Ray worker), each
holding the base model's tokenizer (:class:`ExampleChecker`), loaded once per process, and
in the idle scheduling class (:func:`lower_priority`). One tenant's uploads hold at most all
but one of the processes at once (:class:`OwnerShares`): the rest of its uploads wait their
turn, so another tenant's upload never queues behind a tenant sending large files.

    validator = UploadValidator(settings)
    examples = await validator.count_examples(spooled.path, max_examples=..., owner=tenant.id)

The spooled file is on this machine's disk, so only its path crosses to the process; the
errors come back as raised (:class:`InvalidInputError` naming the line, the 413
:class:`ApiError`), so the answer is the one the route gave when it validated in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

from common.config import Settings
from services.api.errors import ApiError
from services.api.uploads import ExampleChecker, count_valid_examples

log = logging.getLogger(__name__)

T = TypeVar("T")

# The tokenizer of a validation process, loaded by its initializer.
_checker: ExampleChecker | None = None


# Added to a validation process's nice value where the idle scheduling class is not
# available: where the replica shares its cores, the scheduler gives generate calls the CPU
# first and uploads what is left.
VALIDATION_NICENESS = 10


def lower_priority() -> None:
    """Linux's idle scheduling class: a CPU weight of 3, against 36 for a Ray worker at its
    nice 15 (niceness 19, the most ``os.nice`` gives, still weighs 15). Validation runs at
    full speed on idle cores and yields busy ones to serving: two idle-class CPU burners
    left the other tenants' generate p95 unchanged (docs/BENCHMARKS.md, "Load: isolation")."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: niceness instead
        with contextlib.suppress(OSError):
            os.nice(VALIDATION_NICENESS)


def _load_checker(settings: Settings) -> None:
    global _checker
    lower_priority()
    _checker = ExampleChecker.load(settings)


def _count_examples(path: str, max_examples: int) -> int:
    assert _checker is not None, "a validation process runs _load_checker first"
    return count_valid_examples(Path(path), _checker, max_examples=max_examples)


def _warm() -> bool:
    return _checker is not None


class OwnerShares:
    """At most ``share`` validations of one owner (a tenant, the operator) at once; its
    further ones wait, in the order they came, while other owners' go ahead.

    Without it a tenant sending as many uploads as there are processes held all of them,
    and every other tenant's upload queued behind those. Used from one event loop (the
    replica's), so it needs no lock; an owner with nothing running or waiting is forgotten."""

    def __init__(self, share: int) -> None:
        self.share = share
        self._gates: dict[Hashable, tuple[asyncio.Semaphore, int]] = {}  # gate, users

    @contextlib.asynccontextmanager
    async def slot(self, owner: Hashable) -> AsyncIterator[None]:
        gate, users = self._gates.get(owner) or (asyncio.Semaphore(self.share), 0)
        self._gates[owner] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._gates[owner]
            if users == 1:
                del self._gates[owner]
            else:
                self._gates[owner] = (gate, users - 1)

    def owners(self) -> int:
        return len(self._gates)


class UploadValidator:
    """A pool of ``settings.upload_validation_processes`` processes validating uploads, of
    which one owner uses all but one at once (all of them when there is only one). A pool
    whose process died (killed, out of memory) is replaced; the upload that was on it gets a
    503 and may be retried."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self.shares = OwnerShares(max(1, settings.upload_validation_processes - 1))

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.settings.upload_validation_processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_load_checker,
                    initargs=(self.settings,),
                )
            return self._pool

    def warm_up(self, *, timeout: float | None = None) -> bool:
        """Start the processes now (a replica's start), not on the first upload, and wait up
        to ``timeout`` seconds for their tokenizers to load (on a loaded machine spawning
        them takes tens of seconds, which an upload should not pay). True when the warming
        tasks finished, i.e. a process holds its tokenizer (the pool may hand both tasks to the
        first process up); otherwise loading goes on in the background and the first upload
        waits for it."""
        pool = self._executor()
        warming = [pool.submit(_warm) for _ in range(self.settings.upload_validation_processes)]
        done, _ = concurrent.futures.wait(warming, timeout=timeout)
        return len(done) == len(warming)

    async def count_examples(self, path: Path, *, max_examples: int, owner: Hashable) -> int:
        """:func:`count_valid_examples` of the file at ``path``, in a validation process, in
        ``owner``'s share of them."""
        return await self.run(_count_examples, str(path), max_examples, owner=owner)

    async def run(self, function: Callable[..., T], *args: object, owner: Hashable) -> T:
        """``function(*args)`` in a validation process (both picklable), awaited, once
        ``owner`` has a free share of the processes."""
        async with self.shares.slot(owner):
            return await self._run(function, *args)

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(function, *args))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("an upload validation process died; the pool is replaced")
            raise ApiError(
                503, "unavailable", "upload validation failed on the server; retry the upload"
            ) from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
