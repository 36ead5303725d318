"""``ApiContext.run_blocking``: the ingress's blocking calls on threads of its own."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import sqlalchemy as sa

from common.blobstore.local import LocalBlobStore
from common.config import Settings
from services.api.context import BLOCKING_THREADS, ApiContext

REQUEST = contextvars.ContextVar("request", default="none")


def test_blocking_calls_of_many_requests_reuse_a_few_threads_in_the_callers_context(tmp_path):
    """Each request is a task of its own on an event loop that runs forever, as in a Ray
    Serve replica; Starlette's ``run_in_threadpool`` started (and ended) a thread per such
    request there. Here 200 requests share at most ``BLOCKING_THREADS`` threads, and each
    call sees its request's context variables."""
    context = ApiContext(
        settings=Settings(home=tmp_path),
        db=sa.create_engine("sqlite://"),
        blobs=LocalBlobStore(tmp_path / "blobs"),
        inference=None,
        model_fingerprint="test",
    )
    seen: list[tuple[threading.Thread, str]] = []  # the threads themselves: idents are reused

    def lookup() -> None:
        seen.append((threading.current_thread(), REQUEST.get()))

    async def request(number: int) -> None:
        REQUEST.set(f"request-{number}")
        await context.run_blocking(lookup)
        await context.run_blocking(lookup)

    loop = asyncio.new_event_loop()
    done = threading.Event()

    async def requests() -> None:
        for number in range(200):  # one after the other, each in a task of its own
            await asyncio.get_running_loop().create_task(request(number))
        done.set()

    loop.call_soon(lambda: loop.create_task(requests()))
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        assert done.wait(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()
        context.blocking.shutdown()
    assert len(seen) == 400
    assert len({id(thread) for thread, _ in seen}) <= BLOCKING_THREADS
    assert all(thread.name.startswith("prefixd-api-io") for thread, _ in seen)
    assert [value for _, value in seen[:4]] == ["request-0"] * 2 + ["request-1"] * 2
