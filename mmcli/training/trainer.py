"""The training loop: data, model, optimiser, validation, checkpoints, resume, calibration.

:func:`run_train` drives a :class:`Trainer`; the CLI passes callbacks for its progress bar.
Determinism: the model is initialised from ``seed``, and every epoch reseeds the global
torch RNG (dropout) and its own generators (sampling, augmentation) from ``(seed, epoch)``,
so a resumed run repeats exactly what an uninterrupted run does, on the same device.

The best checkpoint is chosen by the *score*: the mean of the validation Dice (when the
model segments) and the validation ROC AUC (when it classifies; the accuracy instead
when the validation labels hold only one class). Without validation images the score is
minus the epoch's training loss.

Training stops at the first loss that is not finite (and at weights that are not, after an
epoch's last step) with :class:`TrainingDiverged`: nothing of that epoch is written, and the
checkpoints of the epochs before it stay as they were.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.config import CLASS_NAMES, PreprocessConfig
from mmcli.errors import MMCLIError, UsageError
from mmcli.io import ownership
from mmcli.io.runfolder import RunLayout, open_run_folder, run_record, write_run_json
from mmcli.io.writers import write_csv
from mmcli.models import create_model, model_kwargs
from mmcli.runtime import (
    apply_precision_policy,
    autocast,
    default_workers,
    keep_freed_memory,
    resolve_device,
    resolve_precision,
)
from mmcli.training.calibration import finish_checkpoints
from mmcli.training.config import TrainConfig, site_augment_record
from mmcli.training.datasets import (
    SPLIT_COLUMNS,
    ImageTable,
    Sample,
    epoch_batches,
    load_table,
    make_splits,
    scan_folders,
    source_rates,
)
from mmcli.training.distributed import (
    all_reduce_gradients,
    any_rank,
    barrier,
    broadcast_parameters,
    init_distributed,
    shutdown,
)
from mmcli.training.fingerprint import check_resumed_data, data_digest, data_record
from mmcli.training.start import freeze_parts, load_init
from mmcli.training.step import evaluate, make_batch, train_step
from mmcli.training.streams import check_streams
from mmcli.weights import Checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["TrainSummary", "Trainer", "TrainingDiverged", "run_train"]

HISTORY_COLUMNS = ("epoch", "lr", "loss", "ce", "pseudo", "mask_rate", "dice", "consistency",
                   "val_dice", "val_acc", "val_auc", "val_nll", "score", "seconds")
StepCallback = Callable[[int, int, dict[str, float]], None]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class TrainingDiverged(MMCLIError):
    """The loss or the weights stopped being finite: the run stops (exit 1) and writes nothing more."""


@dataclass
class TrainSummary:
    """What a finished run reports."""

    out: Path
    epochs_run: int
    best_epoch: int
    best_score: float
    stopped_early: bool
    temperature: float = 1.0
    ece_before: float | None = None
    ece_after: float | None = None
    calibration_kept: str | None = None  # why the temperature stayed 1, when it did
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # False in the other processes of a torchrun job


class Trainer:
    """Prepare everything a run needs; :meth:`epochs` trains and yields one history row per epoch."""

    samples: list[Sample]  # the images that could be read, set by _prepare_data
    table: ImageTable

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.state_path = self.out / "state.pt"
        if self.state_path.exists() and not cfg.resume:
            raise UsageError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        if cfg.resume and not self.state_path.exists():
            raise UsageError(f"--resume: no run to continue in {self.out} (state.pt not found)")
        self.resumed = self._read_state() if cfg.resume else None  # refused before any image is read
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, training=True)
        self.dist, self.device = init_distributed(self.device)
        if cfg.workers is None:  # decoders before the first epoch: every command's rule, shared by the processes
            self.cfg = cfg = replace(cfg, workers=max(1, default_workers(self.device) // self.dist.world))
        apply_precision_policy(self.device, self.precision)
        self.variant = cfg.variant_spec
        self.pre = PreprocessConfig(image_size=cfg.image_size)
        self.class_names = CLASS_NAMES
        self._prepare_data()
        if self.device.type == "cuda":
            # Keep every image on the GPU: batches are cut and augmented there, no copies per step.
            self.table = self.table.to(self.device)
            torch.backends.cudnn.benchmark = True
        self.model_kwargs = model_kwargs(self.variant.model, **cfg.model_overrides())
        torch.manual_seed(cfg.seed)
        self.model = create_model(self.variant.model, **self.model_kwargs).to(self.device)
        self.init, self.init_temperature = None, 1.0
        if cfg.init:  # a resume then loads its own state
            self.init, self.init_temperature = load_init(self.model, cfg.init, model_name=self.variant.model,
                                                         kwargs=self.model_kwargs, image_size=self.pre.image_size)
        self.frozen = freeze_parts(self.model, cfg.freeze, cfg.variant)
        broadcast_parameters(self.model, self.dist)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.epoch, self.best_score, self.best_epoch, self.bad_epochs = 0, -math.inf, 0, 0
        self.history: list[dict[str, Any]] = []
        if self.resumed is not None:
            self._load_state(self.resumed)

    # ---- data ----

    def _prepare_data(self) -> None:
        cfg = self.cfg
        samples = scan_folders([Path(d) for d in cfg.seg_data], [Path(d) for d in cfg.cls_data], self.class_names,
                               [Path(d) for d in cfg.unlabelled_data])
        self.data = data_record(samples, self.class_names)
        if self.resumed is not None:
            check_resumed_data(self.resumed, self.data, self.out)
        table, failures = load_table(samples, cfg.image_size, cfg.workers or 0, voi_lut=cfg.voi_lut)
        for i, reason in failures:
            logger.warning("skipped %s: %s", samples[i].path, reason)
        bad = {i for i, _ in failures}
        keep = [i for i in range(len(samples)) if i not in bad]
        self.samples, self.table = [samples[i] for i in keep], table.subset(keep)
        self.failures = [f"{samples[i].path}: {r}" for i, r in failures]
        # A budget for a task the variant does not train is ignored (unet with --cls-labels 100).
        self.splits = make_splits(self.samples, seg_labels=cfg.seg_labels if self.variant.seg else None,
                                  cls_labels=cfg.cls_labels if self.variant.cls else None,
                                  val_fraction=cfg.val_fraction, seed=cfg.seed)
        pools = {"seg_l": self.splits.seg_labelled, "seg_u": self.splits.seg_unlabelled,
                 "cls_l": self.splits.cls_labelled, "cls_u": self.splits.cls_unlabelled}
        self.pools = {k: pools[k] for k in self.variant.pools()}
        check_streams(cfg, self.pools, samples, self.samples)
        labelled = [len(self.pools[k]) for k in ("seg_l", "cls_l") if k in self.pools]
        self.steps = cfg.steps_per_epoch or max(1, math.ceil(max(labelled) / cfg.batch_size))
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_csv(self.out / "splits.csv", self.splits.rows(self.samples, self.class_names), SPLIT_COLUMNS)

    def _sources(self, pool: list[int]) -> list[str]:
        return [self.samples[i].source for i in pool]

    def sampling(self) -> dict[str, dict[str, float]]:
        """Each stream's share of draws per source folder (see :func:`epoch_batches`), for run.json."""
        return {k: source_rates(pool, self._sources(pool), balanced=self.cfg.balance_sources)
                for k, pool in self.pools.items()}

    def counts(self) -> dict[str, int]:
        s = self.splits
        return {"images": len(self.samples), "unreadable": len(self.failures), "val_seg": len(s.val_seg),
                "val_cls": len(s.val_cls), "seg_labelled": len(s.seg_labelled),
                "seg_unlabelled": len(s.seg_unlabelled), "cls_labelled": len(s.cls_labelled),
                "cls_unlabelled": len(s.cls_unlabelled), "steps_per_epoch": self.steps}

    # ---- state ----

    def _checkpoint(self, temperature: float = 1.0) -> Checkpoint:
        return Checkpoint(
            model_name=self.variant.model, model_kwargs=self.model_kwargs,
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            preprocess=self.pre, class_names=self.class_names, temperature=temperature,
            train_config=self.cfg.to_dict(), trained_image_size=self.cfg.image_size,
            extra={"variant": self.cfg.variant, "epoch": self.epoch, "split_seed": self.cfg.seed,
                   **({"init": self.init} if self.init else {})},
        )

    def _save_state(self) -> None:
        state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "history": self.history, "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(), "data": self.data,
        }
        tmp = self.state_path.with_name("state.pt.tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def _read_state(self) -> dict[str, Any]:
        """The state of the run to resume.

        Raises:
            UsageError: the run was made with other settings.
        """
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        changed = self.cfg.describe_differences(state["config"])
        if changed:
            raise UsageError(f"--resume: these settings differ from the run in {self.out}: {changed} (resume "
                             "with the run's values, or start a new run in another --out)")
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best_score = int(state["epoch"]), float(state["best_score"])
        self.best_epoch, self.bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resuming %s after epoch %d", self.out, self.epoch)

    # ---- loop ----

    def _score(self, row: dict[str, Any]) -> float:
        parts = []
        if "val_dice" in row:
            parts.append(row["val_dice"])
        if "val_auc" in row:
            parts.append(row["val_acc"] if math.isnan(row["val_auc"]) else row["val_auc"])
        return float(np.mean(parts)) if parts else -row["loss"]

    def _train_epoch(self, on_step: StepCallback | None) -> dict[str, float]:
        cfg = self.cfg
        rank, world = self.dist.rank, self.dist.world
        torch.manual_seed(_seed(cfg.seed, self.epoch, 0, rank))
        sampler = torch.Generator().manual_seed(_seed(cfg.seed, self.epoch, 1))
        # All processes draw the same global batches; each takes its own slice of them.
        index = {k: epoch_batches(pool, self.steps, cfg.batch_size * world, sampler,
                                  sources=self._sources(pool) if cfg.balance_sources else None)[:, rank::world]
                 for k, pool in self.pools.items()}
        gen = torch.Generator().manual_seed(_seed(cfg.seed, self.epoch, 2, rank))
        self.model.train()
        totals: dict[str, float] = {}
        for step in range(self.steps):
            batch = make_batch(self.table, {k: v[step] for k, v in index.items()}, gen, self.pre, hflip=cfg.hflip,
                               site_ops=cfg.site_aug)
            loss, stats = train_step(self.model, batch.to(self.device), self.variant, cfg.loss_weights,
                                     autocast(self.device, self.precision))
            if any_rank(not math.isfinite(stats["loss"]), self.dist, self.device):
                raise self._diverged(f"step {step + 1}/{self.steps}: the loss is {stats['loss']}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(self.model, self.dist)
            self.optimizer.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / self.steps
            if on_step is not None:
                on_step(step + 1, self.steps, stats)
        bad = next((k for k, v in self.model.state_dict().items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise self._diverged(f"after its last step the weight {bad!r} is not finite (loss {stats['loss']})")
        return totals

    def _diverged(self, what: str) -> TrainingDiverged:
        kept = (f"the checkpoints of epoch {self.epoch} and best epoch {self.best_epoch} in {self.out} are kept"
                if self.epoch else "no checkpoint was written")
        return TrainingDiverged(f"epoch {self.epoch + 1}, {what}: training diverged and stopped ({kept}); "
                                "try a lower --lr")

    def set_schedule(self, epochs: int, lr_step: int) -> None:
        """Change the number of epochs and the learning-rate step of a run in progress.

        Allowed while the learning rate has not been stepped down yet (``self.epoch <
        min(lr_step, cfg.lr_step)``): the run is then the one ``--epochs epochs --lr-step
        lr_step`` would have given from the start. Used to fit a run to a time budget after
        timing its first epoch.
        """
        if epochs < 1 or lr_step < 1:
            raise UsageError("epochs and lr_step must be >= 1")
        if self.epoch >= min(lr_step, self.cfg.lr_step):
            raise UsageError(f"cannot change the schedule after epoch {self.epoch}: the learning rate has stepped")
        self.cfg = replace(self.cfg, epochs=epochs, lr_step=lr_step)
        self.scheduler.step_size = lr_step

    def epochs(self, on_step: StepCallback | None = None) -> Iterator[dict[str, Any]]:
        """Train until ``cfg.epochs`` or early stopping; yield each epoch's history row."""
        while self.epoch < self.cfg.epochs and not self.stopped_early:
            cfg = self.cfg
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, Any] = {"epoch": self.epoch + 1, "lr": lr, **self._train_epoch(on_step)}
            self.scheduler.step()
            metrics, _, _ = evaluate(self.model, self.table, self.splits.val_seg, self.splits.val_cls, self.pre,
                                     batch_size=cfg.batch_size, device=self.device, precision=self.precision)
            row.update(metrics)
            row["score"] = self._score(row)
            self.epoch += 1
            improved = row["score"] > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = row["score"], self.epoch, 0
            else:
                self.bad_epochs += 1
            row["seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            if self.dist.is_main:
                if improved:
                    save_checkpoint(self._checkpoint(), self.out / "best.safetensors")
                save_checkpoint(self._checkpoint(), self.out / "last.safetensors")
                self._save_state()
                write_csv(self.out / "history.csv", self.history, HISTORY_COLUMNS)
            barrier(self.dist)
            yield row

    @property
    def stopped_early(self) -> bool:
        return self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience

    def ood_split(self) -> tuple[list[int], list[int], str]:
        """The images that fit the out-of-distribution statistics, those that set their threshold, and which.

        With a classifier: its labelled training images and its validation images. The flag
        guards the pneumonia answer, so "in distribution" means like the films whose labels
        the classifier learnt from; unlabelled films (a new site's, adults next to children's
        labels) look familiar to the network without making its answer any better there.
        Without a classifier (or class labels): every training and validation image.
        """
        s = self.splits
        if self.model.cls_head and len(s.cls_labelled) >= 2 and s.val_cls:
            return sorted(s.cls_labelled), sorted(s.val_cls), "labelled classification images"
        fit = sorted(set(s.seg_labelled) | set(s.seg_unlabelled) | set(s.cls_labelled) | set(s.cls_unlabelled))
        return fit, sorted(set(s.val_seg) | set(s.val_cls)), "all images"

    def finish(self) -> dict[str, Any]:
        """Calibrate last and best and store their out-of-distribution statistics
        (:func:`mmcli.training.calibration.finish_checkpoints`, :meth:`ood_split`).

        With the encoder and the classifier frozen, the temperature of ``--init`` is kept, not
        refitted, so that the pneumonia probabilities are exactly those of the starting weights.

        Returns best's ``temperature``, ``ece_before``, ``ece_after``, ``kept`` (why the
        temperature stayed 1: None when it was fitted; ECEs None without a classifier or
        validation labels, or with ``calibrate`` off), ``from_init`` (the temperature is that
        of ``--init``) and ``ood`` (its OOD metadata or None).
        """
        cal: dict[str, Any] = {"temperature": 1.0, "ece_before": None, "ece_after": None, "kept": None,
                               "from_init": False, "ood": None}
        if not self.dist.is_main:
            return cal
        val_cls, carried = None, None
        if {"encoder", "classifier"} <= set(self.cfg.freeze) and self.model.cls_head:
            carried = cal["temperature"] = self.init_temperature
            cal["from_init"] = True
        elif not self.cfg.calibrate:
            cal["kept"] = "--no-calibrate"
        elif self.model.cls_head and not self.splits.val_cls:
            cal["kept"] = "no validation labels"
        elif self.model.cls_head:
            val_cls = self.splits.val_cls
        paths = [self.out / "last.safetensors", self.out / "best.safetensors"]
        # float32 whatever the training precision: predict's classifier runs in float32 under
        # both fp32 and mixed, so the temperature is fitted on the logits it will scale
        *_, best = finish_checkpoints(paths, self.table, self.pre, val_cls=val_cls, temperature=carried,
                                      ood=self.ood_split(), batch_size=self.cfg.batch_size, device=self.device,
                                      precision="fp32")
        if best["calibration"] is not None:
            cal.update(zip(("temperature", "ece_before", "ece_after", "kept"), best["calibration"], strict=True))
        cal["ood"] = best["ood"]
        return cal


def _holds_training(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier training run (its ``run.json`` names ``train``, or, written before
    it did, records the model it trained)."""
    manifest = ownership.read_manifest(folder)
    return manifest is not None and (manifest.get("mmcli_command") == "train" or "model_kwargs" in manifest)


def run_train(cfg: TrainConfig, *, on_start: Callable[[Trainer], None] | None = None,
              on_step: StepCallback | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              command: list[str] | None = None) -> TrainSummary:
    """Train as ``cfg`` says; write best/last checkpoints, state.pt, history.csv, splits.csv and run.json."""
    started = time.time()
    keep_freed_memory()
    layout = RunLayout.in_folder(Path(cfg.out), "best.safetensors")
    cfg = replace(cfg, out=str(layout.folder))  # "~" and relative paths resolved once, for every rank
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run folder, held by torchrun's rank 0
            stack.callback(open_run_folder(layout, "train", holds=_holds_training(layout.folder)).release)
            if not layout.manifest.is_file():  # the folder is train's from now on, even if the start fails
                write_run_json(layout, run_record("train", argv=command, settings=cfg.to_dict(), status="starting"))
        trainer = Trainer(cfg)
        try:
            return _run(trainer, started, on_start, on_step, on_epoch, command)
        finally:
            shutdown(trainer.dist)


def _run(trainer: Trainer, started: float, on_start: Callable[[Trainer], None] | None,
         on_step: StepCallback | None, on_epoch: Callable[[dict[str, Any]], None] | None,
         command: list[str] | None) -> TrainSummary:
    cfg, main = trainer.cfg, trainer.dist.is_main
    if not main:  # only rank 0 reports progress
        on_start = on_step = on_epoch = None
    layout = RunLayout.in_folder(trainer.out, "best.safetensors")
    manifest = run_record(
        "train", argv=command, settings=cfg.to_dict(), status="running", counts=trainer.counts(),
        outputs={"folder": str(trainer.out), "files": []},
    )
    manifest.update({
        "device": str(trainer.device), "precision": trainer.precision,
        "model_name": trainer.variant.model, "model_kwargs": trainer.model_kwargs,
        "preprocess": trainer.pre.to_dict(), "class_names": list(trainer.class_names),
        "sampling": trainer.sampling(),
        "site_augment": site_augment_record(cfg.site_aug), "frozen": trainer.frozen,
        "unreadable": trainer.failures,
        "data": {"sha256": data_digest(trainer.data), "files": len(trainer.data)},  # see mmcli.training.fingerprint
        "world_size": trainer.dist.world,
    })
    if main:
        write_run_json(layout, manifest)
    if on_start is not None:
        on_start(trainer)
    try:
        for row in trainer.epochs(on_step):
            logger.info("epoch %d: %s", row["epoch"], {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
            if on_epoch is not None:
                on_epoch(row)
    except TrainingDiverged as err:
        if main:
            manifest.update({"status": "diverged", "error": str(err), "epochs_run": trainer.epoch,
                             "best_epoch": trainer.best_epoch, "seconds": round(time.time() - started, 1)})
            write_run_json(layout, manifest)
        raise
    done = trainer.finish()
    barrier(trainer.dist)
    summary = TrainSummary(
        out=trainer.out, epochs_run=trainer.epoch, best_epoch=trainer.best_epoch, best_score=trainer.best_score,
        stopped_early=trainer.stopped_early, temperature=done["temperature"], ece_before=done["ece_before"],
        ece_after=done["ece_after"], calibration_kept=done["kept"], history=trainer.history, is_main=main,
    )
    manifest.update({
        "settings": trainer.cfg.to_dict(),  # with the schedule it ended with (see Trainer.set_schedule)
        "status": "stopped early" if summary.stopped_early else "finished", "epochs_run": summary.epochs_run,
        "best_epoch": summary.best_epoch, "best_score": summary.best_score,
        "temperature": done["temperature"], "ece_before": done["ece_before"], "ece_after": done["ece_after"],
        "temperature_kept_at_1": done["kept"], "temperature_from_init": done["from_init"], "ood": done["ood"],
        "seconds": round(time.time() - started, 1),
        "outputs": {"folder": str(trainer.out),
                    "files": ["best.safetensors", "last.safetensors", "state.pt", "history.csv", "splits.csv"]},
    })
    if main:
        write_run_json(layout, manifest)
    return summary
