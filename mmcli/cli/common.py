"""Options shared by several commands, logging setup, and error-to-exit-code mapping."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from mmcli.errors import MMCLIError, UsageError

console = Console(stderr=True, soft_wrap=True)  # one message, one line: log files stay greppable

WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w", envvar="MMCLI_WEIGHTS", show_envvar=True,
        help="Checkpoint file or registered weights name (default: the shipped default weights).",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", envvar="MMCLI_DEVICE", show_envvar=True, help="auto, cpu, cuda, cuda:N or mps.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="auto (bf16 on GPUs and CPUs with AMX/AVX512-BF16, else fp32), fp32 or bf16."),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", min=1, help="Images per model call (default: 2 per CPU worker, 16 on a GPU)."),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", "-j", min=0, envvar="MMCLI_WORKERS", show_envvar=True,
        help="Worker processes (default: one per CPU core; up to 8 decoders beside a GPU); 0: main process only.",
    ),
]
ThresholdOpt = Annotated[
    float,
    typer.Option("--threshold", min=0.0, max=1.0, help="Pneumonia probability from which the label is pneumonia."),
]
VoiLutOpt = Annotated[
    bool, typer.Option("--voi-lut/--no-voi-lut", help="Apply the DICOM VOI LUT or window before scaling.")
]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first file that fails.")]
InputsArg = Annotated[
    list[str], typer.Argument(help="Folders (searched recursively), files or glob patterns.", show_default=False)
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Report file: .csv, .h5 or .hdf5.", show_default=False)]


def setup_logging(verbose: int) -> None:
    """One Rich handler on stderr; tracebacks without local variables (they may hold patient data)."""
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
