"""Two engines that run a case task over many files, both yielding one row per file in input order.

A :class:`CaseTask` says what one case produces (``predict``: a report row and a mask;
``explain``: a row and saliency maps); the engines say where the work runs:

* :func:`iter_rows_loader`: a DataLoader decodes in worker processes while the model
  runs batched in the main process and a pool of processes finishes the cases (GPUs; or
  everything on the main process with ``workers=0``).
* :func:`iter_rows_processes`: on a CPU, each worker process owns a core and runs the
  whole chain (read, preprocess, model on a small batch, mask back to native size, mask
  file) single-threaded. Decoding and inference then never fight over the same cores,
  which on a few cores is faster than one model using them all while decoders interrupt.
  A worker that crashes (a decoder bug on a hostile file) or runs past the time limit
  (``case_timeout`` seconds per file: a hung decoder, a stopped process) costs only its
  files: that process is killed and replaced (:mod:`mmcli.workers`), the batch retried
  file by file, and only the file that fails again alone is reported as an error.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from mmcli.config import DEFAULT_CASE_TIMEOUT, PreprocessConfig, ReadOptions
from mmcli.data.datasets import Case, RadiographDataset, collate_cases, load_case, worker_init
from mmcli.errors import MMCLIError
from mmcli.inference import BatchPrediction, Predictor
from mmcli.io.discover import InputFile
from mmcli.runtime import keep_freed_memory, usable_cores
from mmcli.weights import load_checkpoint
from mmcli.workers import STARTUP_LIMIT, WorkerPool

logger = logging.getLogger(__name__)

CRASH_REASON = "the worker process crashed while reading or predicting this file"


class CaseTask(Protocol):
    """What one case of a batch command produces (a predict row and mask, an explain row and maps).

    A task is a small frozen dataclass: the process engine sends it to its workers.
    """

    @property
    def read(self) -> ReadOptions:
        """How the task's files are read (and whether :meth:`finish` gets their native pixels)."""
        ...

    def run_model(self, predictor: Predictor, images: torch.Tensor,
                  native_sizes: Sequence[tuple[int, int]] | None = None) -> BatchPrediction:
        """The model's outputs for a batch ``(B, 1, S, S)``; with ``native_sizes`` (``(H, W)`` per
        image) masks may come back at native size too (:attr:`BatchPrediction.native_masks`)."""
        ...

    def finish(self, file: InputFile, case: Case, pred: BatchPrediction, k: int) -> dict[str, Any]:
        """The row of a case that was read (:func:`mmcli.data.datasets.load_case`), output ``k`` of ``pred``."""
        ...

    def failed(self, file: InputFile, reason: str) -> dict[str, Any]:
        """The row of a case that failed, with its reason."""
        ...


def _finish_safely(task: CaseTask, file: InputFile, case: Case, pred: BatchPrediction, k: int) -> dict[str, Any]:
    reason = pred.failure(k)  # a NaN or infinite output is an error row, never a label
    if reason is not None:
        return task.failed(file, reason)
    try:
        return task.finish(file, case, pred, k)
    except Exception as err:  # one case fails alone (e.g. its output cannot be written)
        logger.debug("finishing %s failed", file.path, exc_info=True)
        return task.failed(file, f"{type(err).__name__}: {err}")


def _read(files: Sequence[InputFile], task: CaseTask, pre: PreprocessConfig) -> list[Case]:
    return [load_case(f, pre, task.read, index=i) for i, f in enumerate(files)]


def predict_files(predictor: Predictor, files: Sequence[InputFile], task: CaseTask) -> list[dict[str, Any]]:
    """Read, predict and finish ``files`` as one batch in this process."""
    batch = collate_cases(_read(files, task, predictor.preprocess))
    pred = task.run_model(predictor, batch.images) if batch.images is not None else None
    rows = []
    for pos, case in enumerate(batch.cases):
        if case.error is not None:
            rows.append(task.failed(files[pos], case.error))
        else:
            rows.append(_finish_safely(task, files[pos], case, pred, batch.ok.index(pos)))  # type: ignore[arg-type]
    return rows


def _size(case: Case) -> tuple[int, int]:
    """A read case's native ``(H, W)``."""
    assert case.facts is not None
    return case.facts.height, case.facts.width


def iter_rows_loader(
    predictor: Predictor, files: Sequence[InputFile], task: CaseTask, *, batch_size: int, workers: int,
    finishers: int | None = None, native_masks: bool | None = None, case_timeout: float | None = DEFAULT_CASE_TIMEOUT,
) -> Generator[dict[str, Any], None, None]:
    """Decode in DataLoader workers, run the model on batches here, finish cases beside it.

    Beside a GPU (or any device but the CPU) the masks come back from the device at native
    size as packed bits, and cases are finished (mask post-processing, quality control,
    PNG and DICOM writing) in ``finishers`` processes (default :func:`default_finishers`),
    so that neither the device nor the decoders wait for one writer. On the CPU, and with
    ``finishers=0``, one thread of this process finishes them. A finishing process that dies
    costs nothing: the pool is restarted and that case is finished in this process; one that
    takes over ``case_timeout`` seconds is killed with its pool and that case fails, while
    the other cases of that pool run again in a new one (the decoders and the model in this
    process have no time limit).
    ``native_masks`` (default: off the CPU) says whether masks come back at native size.
    """
    keep_freed_memory()  # inherited by the forked decoders and finishers
    native = predictor.device.type != "cpu" if native_masks is None else native_masks
    n_finish = default_finishers(predictor.device, workers) if finishers is None else finishers
    loader = DataLoader(
        RadiographDataset(files, predictor.preprocess, task.read),
        batch_size=batch_size, num_workers=workers, collate_fn=collate_cases,
        worker_init_fn=functools.partial(_init_loader_worker, os.getpid()) if workers else None,
        pin_memory=predictor.device.type == "cuda",
    )
    finisher = _Finisher(task, n_finish, case_timeout)
    pending: deque[tuple[InputFile, Future[dict[str, Any]], _Job | None]] = deque()
    window = max(2 * batch_size, 4 * n_finish)
    batches = iter(loader)
    clean = False
    try:
        for batch in batches:
            pred = None
            if batch.images is not None:
                sizes = [_size(batch.cases[pos]) for pos in batch.ok] if native else None
                pred = task.run_model(predictor, batch.images, sizes)
            for pos, case in enumerate(batch.cases):
                file = files[case.index]
                if case.error is not None:  # queued behind earlier cases: rows come in input order
                    failed: Future[dict[str, Any]] = Future()
                    failed.set_result(task.failed(file, case.error))
                    pending.append((file, failed, None))
                    continue
                pending.append(finisher.submit(file, case, pred, batch.ok.index(pos)))  # type: ignore[arg-type]
            while pending and (pending[0][1].done() or len(pending) > window):
                yield finisher.result(*pending.popleft())
        while pending:
            yield finisher.result(*pending.popleft())
        clean = True
    finally:
        finisher.shutdown(clean=clean)
        if not clean:  # a stop: decoders ignore SIGTERM, and a stopped one would hold up the exit
            for process in getattr(batches, "_workers", ()):
                if process.is_alive():
                    process.kill()


def default_finishers(device: torch.device, decoders: int) -> int:
    """Processes that finish cases beside a device: the cores the decoders leave (at least 1); 0 on a CPU."""
    return 0 if device.type == "cpu" else max(1, usable_cores() - decoders)


@dataclass(frozen=True)
class _Job:
    """A case sent to a finishing process: its pickled work, and which pool (by generation) it went to."""

    blob: bytes
    generation: int


class _Finisher:
    """Finish cases in a thread (``processes=0``) or in a pool of processes that die with this one."""

    def __init__(self, task: CaseTask, processes: int, timeout: float | None = None) -> None:
        self.task, self.processes, self.timeout = task, processes, timeout
        self.generation = 0  # counts the pools: a case remembers which one it went to
        self.killed: set[int] = set()  # the generations killed for another case's time limit
        self.ready: set[int] = set()  # the generations that have answered once: their processes are up
        self.pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor | ProcessPoolExecutor:
        if not self.processes:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcli-finish")
        # spawn: this process holds a CUDA context and the DataLoader's threads, which a fork would copy
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_finisher, initargs=(os.getpid(), self.task))

    def submit(self, file: InputFile, case: Case, pred: BatchPrediction, k: int,
               ) -> tuple[InputFile, Future[dict[str, Any]], _Job | None]:
        """Finish output ``k`` of ``pred``: a process gets that case's outputs alone (:meth:`BatchPrediction.case`)."""
        if not self.processes:
            return file, self.pool.submit(_finish_safely, self.task, file, case, pred, k), None
        blob = pickle.dumps((file, case, pred.case(k), 0), protocol=pickle.HIGHEST_PROTOCOL)  # no shared memory
        return file, *self._send(blob)

    def _send(self, blob: bytes) -> tuple[Future[dict[str, Any]], _Job]:
        try:
            return self.pool.submit(_finish_blob, blob), _Job(blob, self.generation)
        except BrokenProcessPool:
            self._restart()
            return self.pool.submit(_finish_blob, blob), _Job(blob, self.generation)

    def result(self, file: InputFile, fut: Future[dict[str, Any]], job: _Job | None) -> dict[str, Any]:
        """The row of a case sent by :meth:`submit`: a case that runs past the time limit fails, its pool
        killed; the cases that waited or ran in that pool run again in the next one, with the same limit.

        Until a pool has answered once, its processes may still be starting (importing torch on
        a busy machine): the first case of each pool gets :data:`~mmcli.workers.STARTUP_LIMIT`
        seconds more, as a new worker process does.
        """
        if job is None:
            return fut.result()  # a thread cannot be stopped: no time limit
        while True:
            starting = job.generation not in self.ready
            limit = None if self.timeout is None else self.timeout + (STARTUP_LIMIT if starting else 0.0)
            try:
                row = fut.result(timeout=limit)
                self.ready.add(job.generation)
                return row
            except FutureTimeout:
                self._kill()
                return self.task.failed(file, f"timed out after {self.timeout:g} s")
            except (CancelledError, BrokenProcessPool) as err:
                if isinstance(err, BrokenProcessPool) and job.generation not in self.killed:
                    logger.warning("%s: a finishing process died; finishing this case here", file.path)
                    self._restart()
                    return _finish_safely(self.task, *pickle.loads(job.blob))
                # cancelled in the queue of a killed pool, or killed beside the case that hung: not its fault
                fut, job = self._send(job.blob)

    def _replace_pool(self) -> None:
        self.generation += 1
        self.pool = self._new_pool()

    def _restart(self) -> None:
        if getattr(self.pool, "_broken", False):
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._replace_pool()

    def _kill(self) -> None:
        """Replace the pool at once (SIGKILL also ends a hung or stopped process); the cases that were in
        it are then sent to the new one (:meth:`result`)."""
        _kill_pool(self.pool)
        self.killed.add(self.generation)
        self._replace_pool()

    def shutdown(self, *, clean: bool = True) -> None:
        """Wait for the pool after a run that finished; after a stop, end its processes at once."""
        if clean:
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            _kill_pool(self.pool)


def _kill_pool(pool: ThreadPoolExecutor | ProcessPoolExecutor) -> None:
    """Shut ``pool`` down without waiting, its processes (if any) killed first."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


_FINISHER: dict[str, Any] = {}


def _init_finisher(parent: int, task: CaseTask) -> None:
    _start_worker(parent)
    _FINISHER["task"] = task


def _finish_blob(blob: bytes) -> dict[str, Any]:
    return _finish_safely(_FINISHER["task"], *pickle.loads(blob))


_WORKER: dict[str, Any] = {}
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Make this worker process end when the process that started it ends, however it ends.

    On Linux the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``),
    even after ``kill -9``; a parent already gone by now ends this process at once.
    Ctrl-C and SIGTERM are left to the parent, which ends its workers (SIGKILL, so a stopped
    or hung one too) and flushes its journal.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the parent's shutdown still ends us
            logger.debug("prctl(PR_SET_PDEATHSIG) not available", exc_info=True)
    if os.getppid() != parent:
        os._exit(1)


def _start_worker(parent: int) -> None:
    """What every pool process does first: end with its parent, keep freed memory, one thread."""
    _die_with_parent(parent)
    keep_freed_memory()  # forked processes have it already; spawned ones do not
    torch.set_num_threads(1)


def _init_loader_worker(parent: int, worker_id: int) -> None:
    _die_with_parent(parent)
    worker_init(worker_id)


def _serve(conn: Connection, parent: int, weights: str, sha256: str | None, precision: str, task: CaseTask,
           ) -> None:
    """A process engine's worker: load the run's weights, then predict each list of files sent until ``None``.

    Weights that are not the run's (the file was replaced since the run started) are a
    ``fatal`` answer: the run stops rather than mix two models in one report.
    """
    _start_worker(parent)
    try:
        predictor = Predictor(load_checkpoint(weights, expected_sha256=sha256), device="cpu",
                              precision=precision)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - any failure to load stops the run, with its reason
        conn.send(("fatal", f"{type(err).__name__}: {err}" if not isinstance(err, MMCLIError) else str(err)))
        return
    conn.send(("ready", None))
    while (files := conn.recv()) is not None:
        try:
            conn.send(("rows", predict_files(predictor, files, task)))
        except Exception as err:  # noqa: BLE001 - e.g. the model ran out of memory on this batch
            logger.debug("predicting %d file(s) failed", len(files), exc_info=True)
            conn.send(("error", f"{type(err).__name__}: {err}"))


def _mp_context() -> multiprocessing.context.BaseContext:
    # Forked workers start in milliseconds with torch already imported. That is safe
    # here because each worker runs torch on a single thread (no OpenMP pool to inherit
    # in a broken state), as DataLoader workers do; elsewhere spawn is the only choice.
    # Once this process has used CUDA (training on a GPU, then predicting on the CPU in
    # the same process), a forked child cannot run autograd (the bridge saliency): spawn.
    fork = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    return multiprocessing.get_context("fork" if fork else "spawn")


@dataclass(frozen=True)
class _Chunk:
    """Files sent to one worker together; ``alone``: a retry of one file, after its batch crashed or timed out."""

    files: tuple[InputFile, ...]
    alone: bool = False


def iter_rows_processes(
    predictor: Predictor, files: Sequence[InputFile], task: CaseTask, *, batch_size: int, workers: int,
    case_timeout: float | None = DEFAULT_CASE_TIMEOUT,
) -> Generator[dict[str, Any], None, None]:
    """Run whole cases in ``workers`` single-threaded CPU processes, ``batch_size`` files per job.

    A process that dies, or takes over ``case_timeout`` seconds per file of its job, is
    killed and replaced (:class:`mmcli.workers.WorkerPool`); the files of that job run
    again one per job, and a file that then fails alone gets an error row (a single file
    that timed out gets it at once: it would only hang again). Rows come in the order the
    jobs finish.

    Raises:
        MMCLIError: a worker cannot load the run's weights (the file changed since the run started).
    """
    ckpt = predictor.checkpoint
    pool = WorkerPool(_mp_context(), workers, _serve,
                      (os.getpid(), str(ckpt.path), ckpt.sha256, predictor.precision, task))
    limit = math.inf if case_timeout is None else case_timeout
    todo = deque(_Chunk(tuple(files[i : i + batch_size])) for i in range(0, len(files), batch_size))
    clean = False
    try:
        while todo or pool.busy:
            while todo and pool.has_room():
                chunk = todo.popleft()
                pool.submit(chunk, chunk.files, limit * len(chunk.files))
            for chunk, outcome, answer in pool.wait():
                if outcome == "fatal":
                    raise MMCLIError(f"a worker process cannot load the weights the run started with: {answer}; "
                                     "the run is stopped (finished cases are kept: restore the weights and run "
                                     "the same command again to resume)")
                if outcome == "answer" and answer[0] == "rows":
                    yield from answer[1]
                elif len(chunk.files) > 1 or (outcome == "crashed" and not chunk.alone):
                    # rerun one file per job: the file to blame is then the one that fails alone
                    logger.info("a worker %s on %d file(s); running them one by one",
                                _WHAT[outcome], len(chunk.files))
                    todo.extendleft(_Chunk((f,), alone=True) for f in reversed(chunk.files))
                elif outcome == "answer":
                    yield task.failed(chunk.files[0], answer[1])
                else:
                    yield task.failed(chunk.files[0], CRASH_REASON if outcome == "crashed"
                                      else f"timed out after {case_timeout:g} s")
        clean = True
    finally:
        pool.close(clean=clean)


_WHAT = {"crashed": "process crashed", "timed_out": "ran past the time limit", "answer": "failed"}
