"""Worker processes that cannot hang a run: one job at a time each, a time limit per job, killed on the way out.

:class:`WorkerPool` runs ``serve(conn, *args)`` in up to ``size`` processes and hands each
one job at a time through its own pipe, so the parent always knows which job a process
holds and since when. :meth:`WorkerPool.wait` returns every job that ended: with the
worker's answer, because its process died (a decoder bug on a hostile file, the kernel's
out-of-memory killer), or because it ran past its time limit (a hung decoder, a process
stopped with SIGSTOP). A process that died or ran late is killed and replaced by a fresh
one at the next :meth:`WorkerPool.submit`; the others go on.

:meth:`WorkerPool.close` ends every process with SIGKILL, which also ends a stopped one, so
nothing outlives the run and a Ctrl-C or SIGTERM in the parent never waits on a worker.
The parent blocks only in :func:`multiprocessing.connection.wait`, which a signal interrupts.

The protocol: a worker answers ``("ready", None)`` once it is set up, then one message per
job; ``("fatal", reason)`` says it cannot work at all (the run must stop).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any, Literal

logger = logging.getLogger(__name__)

Outcome = Literal["answer", "crashed", "timed_out", "fatal"]
STARTUP_LIMIT = 120.0
"""Seconds a new process may take to get ready (import torch, load the weights) on top of its first job's limit."""
_GOODBYE_WAIT = 5.0  # seconds idle processes get to exit on their own at the end of a run


@dataclass(eq=False)
class _Slot:
    process: Any  # a started multiprocessing Process
    conn: Connection
    ready: bool = False
    job: Any = None
    limit: float = math.inf
    deadline: float = math.inf
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """Up to ``size`` processes of ``context`` running ``serve(conn, *args)``, one job each at a time."""

    def __init__(self, context: BaseContext, size: int, serve: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.context, self.size, self.serve, self.args = context, max(1, size), serve, args
        self.slots: list[_Slot] = []

    @property
    def busy(self) -> list[Any]:
        """The jobs in hand."""
        return [s.job for s in self.slots if s.job is not None]

    def has_room(self) -> bool:
        return len(self.busy) < self.size

    def submit(self, job: Any, payload: Any, limit: float) -> None:
        """Send ``payload`` to an idle process (starting one if needed); ``job`` comes back from :meth:`wait`.

        ``limit``: seconds the process may take to answer (a new process gets :data:`STARTUP_LIMIT` more).
        """
        while (slot := self._idle()) is not None:
            if self._send(slot, job, payload, limit):
                return
            logger.debug("idle worker %d is gone: replaced", slot.process.pid)
            self._drop(slot)
        # a new process that cannot take the job died at its start: wait() reads why ("fatal") or says "crashed"
        self._send(self._start(), job, payload, limit)

    def _idle(self) -> _Slot | None:
        """An idle process that is still alive; idle ones that died since their last job (the kernel's
        out-of-memory killer, a stray SIGKILL) are dropped."""
        for slot in [s for s in self.slots if s.job is None]:
            if slot.process.is_alive():
                return slot
            logger.debug("idle worker %d ended with exit code %s", slot.process.pid, slot.process.exitcode)
            self._drop(slot)
        return None

    @staticmethod
    def _send(slot: _Slot, job: Any, payload: Any, limit: float) -> bool:
        slot.job, slot.limit = job, limit
        slot.deadline = time.monotonic() + limit + (0.0 if slot.ready else STARTUP_LIMIT)
        try:
            slot.conn.send(payload)
        except OSError:  # its end of the pipe is gone: the process died
            return False
        return True

    def wait(self) -> list[tuple[Any, Outcome, Any]]:
        """Block until at least one job ends; returns ``(job, outcome, detail)`` for each that did.

        ``detail``: the worker's message ``(kind, payload)`` for an ``answer``, its reason for ``fatal``.
        """
        while True:
            busy = [s for s in self.slots if s.job is not None]
            if not busy:
                return []
            timeout = max(0.0, min(s.deadline for s in busy) - time.monotonic())
            ready = set(wait([o for s in busy for o in (s.conn, s.process.sentinel)], timeout))
            ended: list[tuple[Any, Outcome, Any]] = []
            for slot in busy:
                if slot.conn in ready or slot.process.sentinel in ready:
                    ended.extend(self._read(slot))
                elif time.monotonic() >= slot.deadline:
                    logger.debug("worker %d ran past its %.0f s limit: killed", slot.process.pid, slot.limit)
                    ended.append((slot.job, "timed_out", None))
                    self._drop(slot)
            if ended:
                return ended

    def _read(self, slot: _Slot) -> list[tuple[Any, Outcome, Any]]:
        while slot.conn.poll():
            try:
                kind, answer = slot.conn.recv()
            except (EOFError, OSError):  # the process died half-way through its answer
                break
            if kind == "ready":
                slot.ready = True
                slot.deadline = time.monotonic() + slot.limit
                continue
            job, slot.job = slot.job, None
            return [(job, "fatal", answer) if kind == "fatal" else (job, "answer", (kind, answer))]
        if slot.process.is_alive():
            return []
        job = slot.job
        logger.debug("worker %d ended with exit code %s", slot.process.pid, slot.process.exitcode)
        self._drop(slot)
        return [(job, "crashed", None)]

    def _start(self) -> _Slot:
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(target=self.serve, args=(child_end, *self.args), daemon=True,  # type: ignore[attr-defined]
                                       name="mmcli-worker")
        process.start()
        child_end.close()
        slot = _Slot(process, parent_end)
        self.slots.append(slot)
        return slot

    def _drop(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        _kill(slot)

    def close(self, *, clean: bool) -> None:
        """End every process: ``clean`` (every job answered) lets idle ones exit; otherwise SIGKILL at once."""
        slots, self.slots = self.slots, []
        if clean:
            for slot in slots:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)  # "no more jobs"
            deadline = time.monotonic() + _GOODBYE_WAIT
            for slot in slots:
                slot.process.join(max(0.0, deadline - time.monotonic()))
        for slot in slots:
            _kill(slot)


def _kill(slot: _Slot) -> None:
    """SIGKILL (a stopped process dies of it too), reap, close the pipe."""
    if slot.process.is_alive():
        slot.process.kill()
    slot.process.join()
    slot.conn.close()
