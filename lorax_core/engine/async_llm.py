"""AsyncLLM: one LLM driven by its own thread, for asyncio callers (the HTTP server, the serving benchmark).

The LLM is not thread-safe, so everything that touches it (adding and aborting requests, loading adapters, the
engine steps) runs on the engine thread: callers hand it callables through a queue and await the result. Each
request's output reaches its caller as StreamDeltas on that caller's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from lorax_core.engine.llm import LLM, Prompt
from lorax_core.engine.outputs import StreamDelta
from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.sequence import Sequence

log = logging.getLogger(__name__)


class _Stream:
    """Where one request's deltas go: an asyncio queue on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.cursor = loop, asyncio.Queue(), [0, 0]
        self.seq: Sequence | None = None  # set on the engine thread once the request is queued

    def put(self, delta: StreamDelta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class AsyncLLM:
    """Runs `llm` on a daemon thread until `close()`; `stream`, `generate` and `call` are awaited from any event
    loop. A step that raises fails the requests it ran (finish_reason "error", with the message) and the engine
    goes on with the rest."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[Sequence, _Stream] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lorax-engine", daemon=True)
        self._thread.start()

    # --- the API ---------------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """fn(*args) run on the engine thread between two steps; its result, or its exception raised here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def job():
            try:
                result = fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, err)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._submit(job)
        return await future

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None
                     ) -> AsyncIterator[StreamDelta]:
        """The request's deltas as they are generated; the last has finish_reason and metrics. A refused request
        raises ValueError before the first delta. Leaving the iteration early (break, a cancelled task, a client
        that went away) aborts the request."""
        target, finished = _Stream(asyncio.get_running_loop()), False
        try:
            await self.call(self._add, prompt, params, adapter, target)
            while not finished:
                delta = await target.queue.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished and not self._closed:  # also when cancelled while the request was being queued
                self._submit(lambda: self._abort(target))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, adapter: str | None = None
                       ) -> StreamDelta:
        """The whole output of one request as a single delta (text, token ids, logprobs joined; metrics)."""
        return StreamDelta.join([delta async for delta in self.stream(prompt, params, adapter)])

    def close(self) -> None:
        """Abort what is still running and stop the engine thread (the LLM stays usable from this thread)."""
        if not self._closed:
            self._closed = True
            self._wake.set()
            self._thread.join()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    # --- the engine thread -----------------------------------------------------------------------------------
    def _submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("this AsyncLLM is closed")
        self._jobs.put(job)
        self._wake.set()

    def _add(self, prompt: Prompt, params: SamplingParams | None, adapter: str | None, target: _Stream) -> None:
        target.seq = self.llm.add_request(prompt, params, adapter)
        self._streams[target.seq] = target

    def _abort(self, target: _Stream) -> None:
        if target.seq is not None:  # None: the request was refused
            self.llm.abort(target.seq)
            self._streams.pop(target.seq, None)

    def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            while not self._jobs.empty():
                self._jobs.get()()
            if not self.llm.scheduler.has_work():
                self._wake.wait()
                continue
            try:
                self.llm.step()
            except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
                log.exception("engine step failed")
                scheduler = self.llm.scheduler
                # the requests it ran fail; with none running (a stall) the waiting ones would fail the same way
                for seq in list(scheduler.running or scheduler.waiting):
                    scheduler.finish(seq, "error", f"the engine step failed: {type(err).__name__}: {err}")
            self._publish()
        for seq in list(self._streams):
            self.llm.abort(seq)
        self._publish()

    def _publish(self) -> None:
        for seq, target in list(self._streams.items()):
            delta = self.llm.next_delta(seq, target.cursor)
            if delta is not None:
                target.put(delta)
            if seq.finished:
                del self._streams[seq]


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
