"""The engine behind the server: loading, admission (backpressure) and engine streams run in threads.

Each engine stream runs in a thread of its own, which iterates the engine's blocking iterator and
hands every item to the event loop through call_soon_threadsafe; the loop never waits on the engine.
A dedicated thread per stream (rather than anyio's pool, one hop per item) lets a stream's thread
own its iterator from start to end, so it is the one that closes it: a generator cannot be closed
from another thread while it runs. Cancelling a stream (client gone, server stopping) sets a flag
that the thread reads after the next item, then it closes the iterator, which aborts the request in
the engine and frees its slot and blocks; that is at most one decode step after the disconnect.

An engine without a scheduler (no num_running) is not safe to call from many threads at once: its
calls are serialized by a lock (concurrent requests then queue here instead of sharing batches). A
tensor-parallel engine is called only on rank 0, after engine.lead() (serve's loader calls it), so its
calls are not mirrored call by call and share batches like a single-process engine's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from contextlib import nullcontext
from typing import Callable, Iterator

from .errors import ApiError

log = logging.getLogger("kimi_engine.server")

_END = object()


class EngineStream:
    """Items of one or more engine iterators, each made and run by its own thread, as an async iterator
    of (source, item). The first failure (an exception making or iterating an iterator) is raised
    from __anext__; the other sources are then cancelled."""

    def __init__(self, factories: list[Callable[[], Iterator]], lock: threading.Lock | None):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._open = len(factories)
        self._started = [self._loop.create_future() for _ in factories]
        self._threads = [threading.Thread(target=self._run, args=(i, f, lock), daemon=True, name=f"kimi-stream-{i}")
                         for i, f in enumerate(factories)]
        for t in self._threads:
            t.start()

    def _put(self, message) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:     # the loop is closed (server gone): nobody is listening any more
            self._cancel.set()

    def _settle(self, index: int, error: BaseException | None) -> None:
        def settle(future=self._started[index]):
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(None)
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            self._cancel.set()

    def _run(self, index: int, factory, lock) -> None:
        try:
            with lock or nullcontext():
                if self._cancel.is_set():
                    return
                try:
                    it = factory()
                except BaseException as e:   # noqa: BLE001 - a bad argument: the request answers 400
                    self._settle(index, e)
                    return
                self._settle(index, None)
                try:
                    for item in it:
                        self._put((index, item))
                        if self._cancel.is_set():
                            break
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()     # aborts an unfinished request in the engine, frees its blocks
        except BaseException as e:   # noqa: BLE001 - handed to the request, which answers for it
            self._put((index, e))
        finally:
            self._settle(index, None)   # cancelled before it started (a no-op once settled)
            self._put((index, _END))

    async def started(self) -> None:
        """Wait until every source's engine call has returned its iterator; raises the first call's error
        (the engine validates its arguments there, before any work)."""
        try:
            for future in self._started:
                await future
        except BaseException:
            self.cancel()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self._open:
            index, item = await self._queue.get()
            if item is _END:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            return index, item
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Abort every source: each thread closes its iterator after its current item."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)


class EngineHost:
    """The engine (None while loading), the admission limit and the streams in flight.

    Admission counts sampling paths: a request for n paths takes n slots. At most
    max_batch_size + max_queue slots are taken at once; past that a request gets 429 with
    retry-after, so a burst queues in bounded memory instead of piling up threads.
    """

    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        self.engine = None
        self.error: BaseException | None = None
        self.max_queue = max_queue
        self.draining = False
        self.lock: threading.Lock | None = None
        self._slots = 0
        self._durations = 1.0          # moving average of request seconds: what a retry-after waits for
        self.streams: set[EngineStream] = set()

    def set_engine(self, engine) -> None:
        self.lock = None if hasattr(engine, "num_running") else threading.Lock()
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    @property
    def capacity(self) -> int:
        return self.engine.max_batch_size + self.max_queue

    @property
    def slots_taken(self) -> int:
        return self._slots

    def require_engine(self):
        if self.draining:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        if self.engine is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise ApiError(503, message, None, "model_not_ready", {"retry-after": "5"})
        return self.engine

    def admit(self, paths: int) -> "Admission":
        self.require_engine()
        if self._slots + paths > self.capacity:
            retry = max(1, math.ceil(self._durations))
            raise ApiError(429, f"too many requests: {self._slots} sampling paths running or queued, limit "
                           f"{self.capacity} (max_batch_size {self.engine.max_batch_size} + max_queue "
                           f"{self.max_queue}); retry after {retry} s", None, "rate_limit_exceeded",
                           {"retry-after": str(retry)})
        self._slots += paths
        return Admission(self, paths)

    def open_stream(self, factories: list[Callable[[], Iterator]]) -> EngineStream:
        stream = EngineStream(factories, self.lock)
        self.streams.add(stream)
        return stream

    def _release(self, paths: int, seconds: float, stream: EngineStream | None) -> None:
        self._slots -= paths
        self._durations = 0.9 * self._durations + 0.1 * seconds
        if stream is not None:
            stream.cancel()
            self.streams.discard(stream)

    def abort_all(self) -> None:
        for stream in list(self.streams):
            stream.cancel()

    def begin_shutdown(self, grace: float) -> None:
        """SIGTERM: refuse new requests (503) and give the running ones `grace` seconds before aborting them.
        Runs on the event loop's thread (uvicorn's signal handler)."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_event_loop().call_later(grace, self.abort_all)


class Admission:
    """A request's slots, released (and its stream cancelled, if still running) when it ends."""

    def __init__(self, host: EngineHost, paths: int):
        self.host, self.paths, self.start = host, paths, time.perf_counter()
        self.stream: EngineStream | None = None
        self._done = False

    def stream_of(self, factories: list[Callable[[], Iterator]]) -> EngineStream:
        self.stream = self.host.open_stream(factories)
        return self.stream

    def release(self) -> None:
        if not self._done:
            self._done = True
            self.host._release(self.paths, time.perf_counter() - self.start, self.stream)
