"""Overlapping pipeline stages: an iterator produced in a background thread, and a writer that runs behind.

Both keep a bounded queue between the threads, so memory stays flat however long the stream is, and both hand
an exception raised in the background thread to the caller's thread unchanged (the same object, so a one-line
`metaportrait.errors.InputError` stays one line). Stopping early never hangs: the caller sets a shared
`threading.Event` (``cancel``), every stage checks it between items, and the background thread is joined before
the call that stopped returns, so no thread outlives the objects it reads or writes (a video file, a writer).

::

    cancel = threading.Event()
    frames = prefetch(reader, depth=4, cancel=cancel, name="decode")  # decoding runs ahead in its own thread
    with WriteBehind(writer.write, depth=4) as behind:                # encoding runs behind in another
        for frame in frames:
            behind.put(process(frame))
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.05  # how often a blocked put / get looks at the cancel flag
_END = object()


class Cancelled(Exception):
    """Raised inside a stage when the consumer stopped early; never reaches the caller of `prefetch`."""


def _put(items: queue.Queue, item, cancel: threading.Event) -> bool:
    """Put ``item`` unless cancelled first; False when cancelled."""
    while not cancel.is_set():
        try:
            items.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterable[T], depth: int, cancel: threading.Event | None = None,
             name: str = "metaportrait-stage") -> Iterator[T]:
    """``items``, produced in a background thread up to ``depth`` items ahead of the consumer.

    The items come out in order. An exception raised while producing them is raised here, after the items
    produced before it. When the consumer stops early (closes this generator, or it is garbage-collected),
    ``cancel`` is set, the producer is stopped at its next item and joined, and ``items`` is closed in the
    producer's thread (so its ``finally`` blocks run there). Pass one ``cancel`` event to every stage of a
    chain: a stage blocked waiting for its input then notices the stop too.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    cancel = cancel if cancel is not None else threading.Event()
    buffer: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not _put(buffer, (item, None), cancel):
                    return
            _put(buffer, (_END, None), cancel)
        except Cancelled:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            _put(buffer, (_END, error), cancel)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Cancelled:
                    pass

    # The caller's context variables (e.g. a web request's progress reporter) are seen in the thread too.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name=name, daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            try:
                item, error = buffer.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if cancel.is_set():
                    raise Cancelled from None
                continue
            if item is _END:
                finished = True
                if error is not None:
                    raise error
                return
            yield item
    finally:
        if not finished:  # stopped early: stop the producer (and, through the shared event, the whole chain)
            cancel.set()
        thread.join()


class WriteBehind:
    """Call ``write(item)`` for every item `put` here, in a background thread, in order.

    Use as a context manager around the loop that produces the items. On a clean exit it waits until every
    item is written; if the loop raises, the writer stops after its current item and the loop's exception
    propagates. An exception raised by ``write`` is raised by the next `put` (or at the exit) in the caller's
    thread; the items after it are not written. Either way the thread has ended when the ``with`` block is left,
    so the object ``write`` writes to can be closed (or aborted) right after.
    """

    def __init__(self, write: Callable[[T], None], depth: int, name: str = "metaportrait-writer"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._write = write
        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,), name=name,
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._buffer.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._cancel.is_set():
                    return
                continue
            if item is _END or self._cancel.is_set():
                return
            try:
                self._write(item)
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
                self._error = error
                self._cancel.set()
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, item: T) -> None:
        """Queue ``item`` for writing (waits while the queue is full); raises the writer's error, if any."""
        self._raise_error()
        if not _put(self._buffer, item, self._cancel):  # the writer failed (or was cancelled) meanwhile
            self._thread.join()
            self._raise_error()
            raise RuntimeError("the writer thread has stopped")

    def close(self) -> None:
        """Wait until everything queued is written; raises the writer's error, if any."""
        if self._thread.is_alive():
            _put(self._buffer, _END, self._cancel)
            self._thread.join()
        self._raise_error()

    def cancel(self) -> None:
        """Stop after the item being written; the rest of the queue is dropped."""
        self._cancel.set()
        self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()
