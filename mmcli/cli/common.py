"""What every command shares: option declarations, logging, progress, errors to exit codes.

One name means one thing on every command. ``--out`` is where a run's outputs go: the
report file for ``predict`` (its run folder is beside it, with the same stem), a folder
for ``explain``, ``evaluate`` and ``train``, which write several reports.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmcli.config import BatchConfig, Precision
from mmcli.errors import MMCLIError, UsageError

console = Console(stderr=True, soft_wrap=True)  # one message, one line: log files stay greppable
logger = logging.getLogger("mmcli.cli")

WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w", envvar="MMCLI_WEIGHTS", show_envvar=True, metavar="FILE|NAME",
        help="Checkpoint file or registered weights name (default: the shipped default weights).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", envvar="MMCLI_DEVICE", show_envvar=True, metavar="DEVICE",
                 help="auto, cpu, cuda, cuda:N or mps."),
]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", metavar="auto|fp32|mixed|bf16",
                 help="mixed: float32 for the classifier and saliency, bf16 for the mask decoder. "
                      "auto: mixed where the device has native bf16 (CUDA from Ampere on, CPUs with AMX "
                      "or AVX-512 bf16), else fp32."),
]
TrainPrecisionOpt = Annotated[
    str,
    typer.Option("--precision", metavar="auto|fp32|bf16",
                 help="auto: bf16 autocast on CUDA GPUs from Ampere on, else fp32."),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, metavar="N",
                 help="Images per model call (default: 2 per CPU worker, 16 on a GPU)."),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", "-j", min=0, envvar="MMCLI_WORKERS", show_envvar=True, metavar="N",
        help="Worker processes (default: one per CPU core; up to 8 decoders beside a GPU); 0: main process only.",
    ),
]
ThresholdOpt = Annotated[
    float,
    typer.Option("--threshold", min=0.0, max=1.0, metavar="P",
                 help="Pneumonia probability from which the label is pneumonia."),
]
VoiLutOpt = Annotated[
    bool, typer.Option("--voi-lut/--no-voi-lut", help="Apply the DICOM VOI LUT or window before scaling.")
]
QAOpt = Annotated[
    str,
    typer.Option("--qa", metavar="warn|refuse|off",
                 help="Quality control: warn (flag; doubtful images labelled uncertain), refuse (flagged cases fail), "
                      "off."),
]
RawMasksOpt = Annotated[
    bool, typer.Option("--raw-masks", help="Keep the network's own lung mask (default: at most two plausible lungs, "
                                          "holes filled).")
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", min=0, metavar="N", callback=lambda value: value or None,  # 0: no limit
                 help="Refuse images over N pixels (width x height x frames), checked before decoding; 0: no limit."),
]
CaseTimeoutOpt = Annotated[
    float,
    typer.Option("--case-timeout", min=0.001, metavar="SECONDS",
                 help="A case still running after this long in a worker process fails (\"timed out after N s\") "
                      "and its worker is replaced."),
]
FailFastOpt = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first file that fails (the rest get status skipped).")
]
def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"3/8"`` -> ``(3, 8)``."""
    if value is None:
        return None
    k, sep, n = value.partition("/")
    if not (sep and k.strip().isdigit() and n.strip().isdigit()):
        raise typer.BadParameter(f"expected K/N such as 0/8, got {value!r}")
    return int(k), int(n)


ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", metavar="K/N", callback=parse_shard,  # the command receives (K, N)
                 help="Run part K of N (0 <= K < N) of the inputs, into <out>.shard-K-of-N; `mmcli merge` joins them."),
]
VerifyInputsOpt = Annotated[
    bool, typer.Option("--verify-inputs", help="On resume, compare each input's sha256, not only its size and mtime.")
]
AnonymizeOpt = Annotated[
    Path | None,
    typer.Option("--anonymize-ids", metavar="FILE",
                 help="Case ids become salted hashes and sources are left out; FILE (kept apart from the outputs) "
                      "maps them back."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Start again instead of resuming (by default finished cases are skipped).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary line.")]
HDF5Opt = Annotated[
    Path | None,
    typer.Option("--hdf5", metavar="FILE", help="Also write the report to this HDF5 file (predict: with every mask)."),
]
InputsArg = Annotated[
    list[str],
    typer.Argument(metavar="INPUT", help="Folders (searched recursively), files or glob patterns.",
                   show_default=False),
]
ReportOutOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="FILE", help="Report file: .csv, .h5 or .hdf5.", show_default=False)
]


_MODEL_RUN = ("weights", "device", "precision", "batch_size", "workers", "threshold", "voi_lut", "max_pixels", "qa",
              "raw_masks", "overwrite")
_BATCH = ("fail_fast", "verify_inputs", "anonymize_ids", "shard", "case_timeout")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(BatchConfig) if f.name in (*_MODEL_RUN, *_BATCH)}
"""The shared options' defaults: the config's own, so that an option not given means "the config's default"."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options every model-running command shares, as :func:`model_run_options` hands them to it.

    The fields are :class:`mmcli.config.BatchConfig`'s of the same names (their defaults are the
    config's), plus ``quiet``; :meth:`settings` gives those a config takes.
    """

    weights: str | None = _DEFAULTS["weights"]
    device: str = _DEFAULTS["device"]
    precision: Precision = _DEFAULTS["precision"]
    batch_size: int | None = _DEFAULTS["batch_size"]
    workers: int | None = _DEFAULTS["workers"]
    threshold: float = _DEFAULTS["threshold"]
    voi_lut: bool = _DEFAULTS["voi_lut"]
    max_pixels: int | None = _DEFAULTS["max_pixels"]
    qa: str = _DEFAULTS["qa"]
    raw_masks: bool = _DEFAULTS["raw_masks"]
    overwrite: bool = _DEFAULTS["overwrite"]
    fail_fast: bool = _DEFAULTS["fail_fast"]
    verify_inputs: bool = _DEFAULTS["verify_inputs"]
    anonymize_ids: Path | None = _DEFAULTS["anonymize_ids"]
    shard: tuple[int, int] | None = _DEFAULTS["shard"]
    case_timeout: float = _DEFAULTS["case_timeout"]
    quiet: bool = False

    def settings(self, config: type) -> dict[str, Any]:
        """These options as keyword arguments of the dataclass ``config`` (the fields it has)."""
        names = {f.name for f in fields(config)}
        return {name: getattr(self, name) for name in (*_MODEL_RUN, *_BATCH) if name in names}


def model_run_options(*, batch: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of every command that runs the model, declared once, here.

    ``batch``: also the options of commands over INPUT... (``--fail-fast``, ``--verify-inputs``,
    ``--anonymize-ids``, ``--shard``, ``--case-timeout``). The command declares its own
    parameters and a keyword-only ``run: RunOptions``, which receives these options (their
    defaults are the config's). In ``--help`` they come right after the command's required
    parameters.
    """
    shared: list[tuple[str, Any]] = [
        ("weights", WeightsOpt), ("device", DeviceOpt), ("precision", PrecisionOpt), ("batch_size", BatchSizeOpt),
        ("workers", WorkersOpt), ("threshold", ThresholdOpt), ("voi_lut", VoiLutOpt), ("max_pixels", MaxPixelsOpt),
        ("qa", QAOpt), ("raw_masks", RawMasksOpt), ("overwrite", OverwriteOpt),
        *([("fail_fast", FailFastOpt), ("verify_inputs", VerifyInputsOpt), ("anonymize_ids", AnonymizeOpt),
           ("shard", ShardOpt), ("case_timeout", CaseTimeoutOpt)] if batch else []),
        ("quiet", QuietOpt),
    ]

    def add(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "run"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS.get(name, False),
                                   annotation=annotation) for name, annotation in shared]
        required = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is p.empty]
        optional = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not p.empty]
        signature = inspect.Signature([*required, *added, *optional])

        @functools.wraps(command)
        def with_options(**given: Any) -> None:
            run = RunOptions(**{name: given.pop(name) for name, _ in shared})
            command(**given, run=run)

        # Typer reads a command's parameters through inspect.signature, which honours __signature__
        with_options.__signature__ = signature  # type: ignore[attr-defined]  # not declared on Callable
        with_options.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return with_options

    return add


def folder_out(what: str) -> Any:
    """``--out`` for a command that writes a folder of ``what``."""
    return Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help=f"Folder for {what}.", show_default=False)]


_VERBOSITY = {"level": 0}


def setup_logging(verbose: int) -> None:
    """One Rich handler on stderr; tracebacks without local variables (they may hold patient data)."""
    _VERBOSITY["level"] = verbose
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger("mmcli")
    root.handlers.clear()
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=True, tracebacks_show_locals=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a batch job's log file: one plain line per message
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def say(text: str) -> None:
    """One plain line on stderr (never read as markup)."""
    console.print(escape(text), highlight=False)


class Ticker:
    """Progress of ``total`` steps: a Rich bar on a terminal, else a plain line every 5 %.

    ``advance(failed=...)`` counts one finished step. Nothing is shown with ``quiet``.
    """

    def __init__(self, name: str, total: int, *, quiet: bool = False, unit: str = "done") -> None:
        self.name, self.total, self.quiet, self.unit = name, total, quiet, unit
        self.done = self.failed = 0
        self.bar = not quiet and console.is_terminal
        self._progress = Progress(
            TextColumn(f"[bold]{escape(name)}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not self.bar,
        )
        self._task = self._progress.add_task(name, total=total, failed=0)
        self._every = max(1, total // 20)

    def __enter__(self) -> Ticker:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        self._progress.update(self._task, advance=1, failed=self.failed)
        if not self.bar and not self.quiet and (self.done % self._every == 0 or self.done == self.total):
            say(f"{self.name}: {self.done}/{self.total} {self.unit}, {self.failed} failed")


def follow_rows(name: str, rows: Iterable[dict[str, Any]], total: int, *, quiet: bool) -> None:
    """Loop over a run's rows with progress; each failed case, and each case whose DICOM output could not be
    written, gets one warning line naming its file."""
    with Ticker(name, total, quiet=quiet) as ticker:
        for row in rows:
            failed = row.get("status") in ("error", "missing")  # mmcli.status.Status (not imported at CLI start)
            case = row.get("source") or row.get("case_id")  # no source with --anonymize-ids
            if failed:
                logger.warning("%s: %s", case, row.get("error"))
            elif row.get("dicom_error"):  # the case is ok; only its DICOM output is missing
                logger.warning("%s: %s", case, row["dicom_error"])
            else:
                logger.info("%s: %s", case, row.get("status"))
            ticker.advance(failed=failed)


class Terminated(Exception):
    """SIGTERM arrived (a batch scheduler's stop): handled like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def stop_cleanly(what: str, resume_hint: str) -> Iterator[None]:
    """Turn Ctrl-C (exit 130) and SIGTERM (exit 143) into one line saying how to resume.

    The library's generators close on the way out: workers stop, the journal is flushed,
    no report is written half-way.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        cause, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        say(f"Stopped by {cause}: {what}; {resume_hint}")
        raise typer.Exit(code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def drive_run(name: str, run: Any, *, quiet: bool) -> None:
    """Run a :class:`mmcli.batch.BatchRun` with progress and a summary line; exit 1 if a case failed."""
    if run.resumed and not quiet:
        say(f"Resuming: {run.resumed} case(s) already done, {len(run.todo)} to go.")
    with stop_cleanly(f"finished cases are kept in {run.job.layout.journal}",
                      "run the same command again to resume"):
        follow_rows(name, run, len(run.todo), quiet=quiet)
    summary = run.summary
    if not quiet:
        flagged = f" ({summary.flagged} flagged by quality control)" if summary.flagged else ""
        say(f"{summary.ok} ok{flagged}, {summary.failed} failed, {summary.skipped} skipped "
            f"({summary.resumed} resumed) in {summary.seconds:.1f} s -> {summary.report}")
    if summary.failed:
        raise typer.Exit(1)


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn library errors into a one-line message and an exit code (2 usage, 1 failure)."""
    try:
        yield
    except UsageError as err:
        console.print(f"[bold red]Error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
    except MMCLIError as err:
        console.print(f"[bold red]Error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as err:  # an output that cannot be written, outside a run's own checks
        if _VERBOSITY["level"] > 0:
            raise
        where = f"{err.filename}: " if err.filename else ""
        console.print(f"[bold red]Error:[/] {escape(where + str(err.strerror or err))}", highlight=False)
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:  # a bug: one line, the traceback only when asked for
        if _VERBOSITY["level"] > 0:
            raise
        console.print(f"[bold red]Error:[/] unexpected {type(err).__name__}: {escape(str(err))} "
                      "(run with -v for the traceback)", highlight=False)
        raise typer.Exit(1) from None
