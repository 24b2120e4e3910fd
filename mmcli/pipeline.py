"""Two ways to run the predictor over many files, both yielding one report row per file.

* :func:`iter_rows_loader`: a DataLoader decodes in worker processes while the model
  runs batched in the main process (GPUs; or everything on the main process with
  ``workers=0``).
* :func:`iter_rows_processes`: on a CPU, each worker process owns a core and runs the
  whole chain (read, preprocess, model on a small batch, mask back to native size, mask
  file) single-threaded. Decoding and inference then never fight over the same cores,
  which on a few cores is faster than one model using them all while decoders interrupt.
  A worker that crashes (a decoder bug on a hostile file) costs only its files: the pool
  is restarted, the batch retried file by file, and only the file that crashes again is
  reported as an error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmcli.data.datasets import RadiographDataset, collate_cases, load_case, worker_init
from mmcli.data.transforms import mask_to_native
from mmcli.inference import BatchPrediction, Predictor
from mmcli.io.discover import InputFile
from mmcli.io.writers import Journal, write_mask_png
from mmcli.weights import load_checkpoint

logger = logging.getLogger(__name__)

REPORT_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "error", "p_pneumonia", "label",
    "lung_fraction", "lung_area_mm2", "height", "width", "mask",
)
CRASH_REASON = "the worker process crashed while reading or predicting this file"


@dataclass(frozen=True)
class RowSettings:
    """What turning a prediction into a report row and a mask file needs."""

    threshold: float
    masks_dir: Path
    report_dir: Path
    class_names: tuple[str, ...]
    voi_lut: bool = False


def record_rows(
    results: Generator[dict[str, Any], None, None],
    journal: Journal,
    rows: dict[str, dict[str, Any]],
    *,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    fail_fast: bool = False,
) -> None:
    """Drain an engine's rows into ``rows`` and the journal; stop at the first error if asked.

    The engine and the journal are closed however this ends (a kill, ``--fail-fast``).
    """
    try:
        for row in results:
            rows[row["case_id"]] = row
            journal.append(row)
            if on_case is not None:
                on_case(row)
            if fail_fast and row["status"] == "error":
                break
    finally:
        results.close()
        journal.close()


def new_row(file: InputFile, **values: Any) -> dict[str, Any]:
    """A report row for ``file`` with every column present (``None`` where unknown)."""
    row: dict[str, Any] = dict.fromkeys(REPORT_COLUMNS)
    row.update(case_id=file.case_id, source=str(file.path), **values)
    return row


def finish_case(
    file: InputFile, meta: dict[str, Any], prob: float | None, mask_logits: torch.Tensor | None, rs: RowSettings
) -> dict[str, Any]:
    """Post-process one case: label, mask at native resolution, areas, mask file.

    Args:
        mask_logits: ``(1, S, S)`` logits on the model grid, or ``None`` without a decoder.
    """
    height, width = int(meta["height"]), int(meta["width"])
    row = new_row(file, status="ok", height=height, width=width)
    if prob is not None:
        row["p_pneumonia"] = round(prob, 6)
        row["label"] = rs.class_names[-1] if prob >= rs.threshold else rs.class_names[0]
    if mask_logits is not None:
        mask = mask_to_native(mask_logits, height, width).numpy()
        lung_pixels = int(mask.sum())
        row["lung_fraction"] = round(lung_pixels / mask.size, 6)
        spacing = meta.get("pixel_spacing")
        if spacing:
            row["lung_area_mm2"] = round(lung_pixels * float(spacing[0]) * float(spacing[1]), 2)
        mask_path = rs.masks_dir / f"{file.case_id}.png"
        write_mask_png(mask_path, mask)
        row["mask"] = os.path.relpath(mask_path, rs.report_dir)
    return row


def _outputs(pred: BatchPrediction | None, k: int) -> tuple[float | None, torch.Tensor | None]:
    assert pred is not None  # an item with an image always has a prediction
    prob = float(pred.probabilities[k, -1]) if pred.probabilities is not None else None
    logits = pred.mask_logits[k] if pred.mask_logits is not None else None
    return prob, logits


def predict_files(predictor: Predictor, files: Sequence[InputFile], rs: RowSettings) -> list[dict[str, Any]]:
    """Read, predict and post-process ``files`` as one batch in this process."""
    items = [load_case(f, predictor.preprocess, index=i, voi_lut=rs.voi_lut) for i, f in enumerate(files)]
    batch = collate_cases(items)
    pred = predictor.predict(batch["images"]) if batch["images"] is not None else None
    rows = []
    for pos, item in enumerate(batch["items"]):
        if item["error"] is not None:
            rows.append(new_row(files[pos], status="error", error=item["error"]))
        else:
            prob, logits = _outputs(pred, batch["ok"].index(pos))
            rows.append(finish_case(files[pos], item["meta"], prob, logits, rs))
    return rows


def iter_rows_loader(
    predictor: Predictor, files: Sequence[InputFile], rs: RowSettings, *, batch_size: int, workers: int
) -> Iterator[dict[str, Any]]:
    """Decode in DataLoader workers, predict batches here, write masks in a thread."""
    loader = DataLoader(
        RadiographDataset(files, predictor.preprocess, voi_lut=rs.voi_lut),
        batch_size=batch_size, num_workers=workers, collate_fn=collate_cases,
        worker_init_fn=worker_init if workers else None, pin_memory=predictor.device.type == "cuda",
    )
    pending: deque[Future[dict[str, Any]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcli-write") as pool:
        for batch in loader:
            pred = predictor.predict(batch["images"]) if batch["images"] is not None else None
            for pos, item in enumerate(batch["items"]):
                file = files[item["index"]]
                if item["error"] is not None:  # queued behind earlier cases: rows come in input order
                    failed: Future[dict[str, Any]] = Future()
                    failed.set_result(new_row(file, status="error", error=item["error"]))
                    pending.append(failed)
                    continue
                prob, logits = _outputs(pred, batch["ok"].index(pos))
                pending.append(pool.submit(finish_case, file, item["meta"], prob, logits, rs))
            while pending and (pending[0].done() or len(pending) > 2 * batch_size):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_WORKER: dict[str, Any] = {}


def _init_worker(weights: str, sha256: str | None, precision: str, rs: RowSettings) -> None:
    torch.set_num_threads(1)
    ckpt = load_checkpoint(weights, expected_sha256=sha256)
    _WORKER["predictor"] = Predictor(ckpt, device="cpu", precision=precision)  # type: ignore[arg-type]
    _WORKER["rs"] = rs


def _worker_task(files: list[InputFile]) -> list[dict[str, Any]]:
    return predict_files(_WORKER["predictor"], files, _WORKER["rs"])


def _mp_context() -> multiprocessing.context.BaseContext:
    # Forked workers start in milliseconds with torch already imported. That is safe
    # here because each worker runs torch on a single thread (no OpenMP pool to inherit
    # in a broken state), as DataLoader workers do; elsewhere spawn is the only choice.
    # Once this process has used CUDA (training on a GPU, then predicting on the CPU in
    # the same process), a forked child cannot run autograd (the bridge saliency): spawn.
    fork = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    return multiprocessing.get_context("fork" if fork else "spawn")


def _retrying(inflight: dict[Any, tuple[list[InputFile], bool]]) -> bool:
    return any(retried for _, retried in inflight.values())


def iter_rows_processes(
    predictor: Predictor, files: Sequence[InputFile], rs: RowSettings, *, batch_size: int, workers: int
) -> Iterator[dict[str, Any]]:
    """Run whole cases in ``workers`` single-threaded CPU processes, ``batch_size`` files per task."""
    ckpt = predictor.checkpoint
    initargs = (str(ckpt.path), ckpt.sha256, predictor.precision, rs)
    todo: deque[tuple[list[InputFile], bool]] = deque(
        (list(files[i : i + batch_size]), False) for i in range(0, len(files), batch_size)
    )
    while todo:
        crashed: list[tuple[list[InputFile], bool]] = []
        inflight: dict[Future[list[dict[str, Any]]], tuple[list[InputFile], bool]] = {}
        pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker, initargs=initargs)
        try:
            while (todo or inflight) and not crashed:
                # A retried file runs alone, so a crash can be blamed on that file.
                while todo and len(inflight) < 2 * workers and not (inflight and (todo[0][1] or _retrying(inflight))):
                    task = todo.popleft()
                    inflight[pool.submit(_worker_task, task[0])] = task
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = inflight.pop(fut)
                    try:
                        rows = fut.result()
                    except BrokenProcessPool:
                        crashed.append(task)
                        continue
                    yield from rows
            for fut, task in inflight.items():  # the pool broke: keep what finished, redo the rest
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    yield from fut.result()
                else:
                    crashed.append(task)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for chunk, retried in crashed:
            if retried:
                logger.warning("%s: %s", chunk[0].path, CRASH_REASON)
                yield new_row(chunk[0], status="error", error=CRASH_REASON)
            else:
                todo.extendleft(([f], True) for f in reversed(chunk))
