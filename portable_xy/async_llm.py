"""``AsyncLLM``: the engine core behind an asyncio API, for online serving.

The engine runs on a thread of its own. Callers (coroutines on any event loop) hand it requests
and aborts through a queue; the thread drains the queue between steps, so a request that arrives
mid-batch joins at the next step (continuous batching under the token-wise scheduler). Every step's
outputs go back to each request's ``asyncio.Queue`` on its caller's loop. All engine state is
touched by the engine thread only.

A step that raises fails the requests it ran, with the error (their blocks are freed); the loop and
the other requests carry on. A request whose consumer stops iterating (a client that disconnects)
is aborted. :meth:`AsyncLLM.shutdown` stops the thread and fails what is still running.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from .config import EngineConfig
from .distributed import TensorParallelError
from .engine.input_processor import InputProcessor, PromptType
from .engine.llm_engine import EngineStepError, LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

StatLogger = Callable[[LLMEngine, bool], None]  # (engine, a step ran) -> None, on the engine thread


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting_requests``); retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or an error outside any step)."""


class _Sink:
    """Where the engine thread puts one request's outputs: a queue on its caller's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


def _put_all(items: list[tuple[_Sink, RequestOutput | BaseException]]) -> None:
    """(the callers' loop) One step's outputs into their requests' queues."""
    for sink, item in items:
        sink.queue.put_nowait(item)


class RequestStream:
    """One request's outputs, an async iterator on its caller's event loop; the last output has
    ``finished=True``. A stream closed (:meth:`close`) or dropped before its request finished
    aborts the request, so an abandoned request never keeps its blocks."""

    def __init__(self, llm: AsyncLLM, request_id: str, sink: _Sink) -> None:
        self.request_id = request_id
        self._sink = sink
        self._llm = llm
        self._open = weakref.finalize(self, llm._abandon, request_id)  # runs on close() or when dropped

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._open.alive:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException) or item.finished:
            self._open.detach()  # the engine is done with it: nothing to abort
            self._llm._streams.pop(self.request_id, None)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Abort the request unless it finished."""
        self._open()


class AsyncLLM:
    """vLLM's ``AsyncLLM`` surface: ``generate`` (an async iterator of outputs), ``abort``,
    ``shutdown``. ``AsyncLLM(model, **kwargs)`` takes :class:`EngineConfig`'s fields, like ``LLM``.

    ``max_waiting_requests``: most requests waiting for their first step; beyond it ``generate``
    raises :class:`EngineOverloadedError` (None: no bound). ``stat_loggers`` run on the engine
    thread after each step and after requests are added or aborted.

    ``start_thread=True`` runs the engine loop on a thread of its own. With ``False`` the caller
    runs it, with :meth:`run`, on a thread of its choosing: the server runs it on the process's
    main thread, the thread that loaded the model, because CPU kernels parallelised with OpenMP
    run slower from a second thread once the first has used its own OpenMP pool."""

    def __init__(
        self,
        model: str | None = None,
        *,
        max_waiting_requests: int | None = None,
        stat_loggers: list[StatLogger] | None = None,
        start_thread: bool = True,
        **kwargs: Any,
    ) -> None:
        config = EngineConfig.from_kwargs("AsyncLLM", model=model, **kwargs)
        self._setup(LLMEngine.from_config(config), max_waiting_requests, stat_loggers, start_thread)

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        max_waiting_requests: int | None = None,
        stat_loggers: list[StatLogger] | None = None,
        start_thread: bool = True,
    ) -> AsyncLLM:
        self = cls.__new__(cls)
        self._setup(LLMEngine.from_config(config), max_waiting_requests, stat_loggers, start_thread)
        return self

    def _setup(
        self, engine: LLMEngine, max_waiting: int | None, stat_loggers: list[StatLogger] | None, start_thread: bool
    ) -> None:
        if max_waiting is not None and (not isinstance(max_waiting, int) or isinstance(max_waiting, bool)
                                        or max_waiting < 0):  # fmt: skip
            raise ValueError(f"max_waiting_requests must be None or a non-negative int, got {max_waiting!r}")
        self.engine = engine
        self.config = engine.config
        self.max_waiting_requests = max_waiting
        self.stat_loggers = list(stat_loggers or [])
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Sink] = {}  # requests accepted and not yet finished
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestOutput | BaseException]]] = {}
        self._num_running = 0
        self._stopping = False
        self.dead_error: BaseException | None = None
        self._done = threading.Event()  # the engine loop has ended
        self._loop_thread: threading.Thread | None = None
        if start_thread:
            self._loop_thread = threading.Thread(target=self.run, name="portable_xy-engine", daemon=True)
            self._loop_thread.start()

    # ---- the caller's side -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def input_processor(self) -> InputProcessor:
        """Checks and tokenizes prompts and conversations; :meth:`add_request` takes what it
        returns without checking again."""
        return self.engine.inputs

    @property
    def is_running(self) -> bool:
        """Whether requests are accepted (the loop has not ended nor been asked to)."""
        return not self._stopping

    def add_request(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> RequestStream:
        """Queue a request now and return its outputs' stream. Bad input, a request id in use, a
        full waiting queue or a stopped engine raise here, before anything is queued."""
        text, ids = self.input_processor.prompt(prompt)
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.dead_error or 'shut down'})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the engine's waiting queue is full ({self.max_waiting_requests} requests); retry later"
            )
        sink = self._streams[request_id] = _Sink()
        self._send("add", (request_id, text, ids, sampling_params, priority))
        return RequestStream(self, request_id, sink)

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's API: the request's outputs as its tokens arrive (``sampling_params.output_kind``:
        everything so far, or only what is new), the last one with ``finished=True``. A consumer
        that stops early aborts the request."""
        stream = self.add_request(prompt, sampling_params, request_id, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its ``generate`` ends with a last output whose
        unfinished completions have ``finish_reason="abort"``."""
        self._send("abort", request_id)

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running (queued here or in the scheduler), from the count
        of running requests the engine thread published after its last step (engine state is not
        read from other threads)."""
        return max(0, len(self._streams) - self._num_running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine loop (after the step in flight) and fail every unfinished request; waits
        for the loop to end unless called from the loop's own thread."""
        self._stopping = True
        self._wake.set()
        if self._loop_thread is None:  # the loop never ran: nothing is in flight
            self._fail_all()
            self.engine.shutdown()
        elif self._loop_thread is not threading.current_thread():
            self._done.wait(timeout)

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    def _abandon(self, request_id: str) -> None:
        """(any thread) A stream went away before its request finished: forget it, abort it."""
        self._streams.pop(request_id, None)
        self._send("abort", request_id)

    # ---- the engine thread -------------------------------------------------------------------
    def run(self) -> None:
        """Run the engine loop on the calling thread until :meth:`shutdown` (for an engine built
        with ``start_thread=False``; its own thread runs it otherwise)."""
        if self._loop_thread not in (None, threading.current_thread()):
            raise RuntimeError("the engine loop already runs on another thread")
        self._loop_thread = threading.current_thread()
        gc.collect()
        gc.freeze()  # what exists now (model, tokenizer, modules) lives on: full collections skip it
        try:
            while not self._stopping:
                if self._drain_commands():
                    self._log(stepped=False)
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except EngineStepError as e:
                    self._log(stepped=False)
                    for rid in e.request_ids:
                        self._deliver(rid, e)
                    self._flush()
                    if isinstance(e.cause, TensorParallelError):  # no further step can run
                        self.dead_error = e.cause
                        break
                    continue
                self._log(stepped=True)  # before the outputs: a caller they wake sees this step's counts
                for out in outputs:
                    self._deliver(out.request_id, out)
                self._flush()
        except BaseException as e:  # noqa: BLE001 - the engine itself broke: fail everything, say why
            self.dead_error = e
        finally:
            self._fail_all()
            self.engine.shutdown()
            self._done.set()

    def _fail_all(self) -> None:
        """Stop accepting requests; abort every unfinished one and tell its caller why."""
        self._stopping = True
        err = EngineDeadError(f"the engine stopped ({self.dead_error or 'shut down'})")
        for rid in list(self._streams):
            self.engine.abort_request(rid)
            self._deliver(rid, err)
        self._flush()

    def _drain_commands(self) -> bool:
        changed = False
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                self._flush()
                return changed
            changed = True
            if kind == "add":
                rid, text, ids, params, priority = payload
                if rid in self._streams:  # not already abandoned by its caller
                    self.engine.add_request(rid, text, ids, params, priority)
            else:
                out = self.engine.abort_request(payload)
                if out is not None:
                    self._deliver(payload, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Queue an output or an error for the request's caller (sent by :meth:`_flush`); the last
        one also ends the request's place here, whether or not its caller still reads."""
        last = isinstance(item, BaseException) or item.finished
        sink = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if sink is not None:
            self._outbox.setdefault(sink.loop, []).append((sink, item))

    def _flush(self) -> None:
        """Hand the queued outputs over: one wake-up per caller loop, not one per output."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _log(self, stepped: bool) -> None:
        self._num_running = self.engine.num_running
        for logger in self.stat_loggers:
            logger(self.engine, stepped)
