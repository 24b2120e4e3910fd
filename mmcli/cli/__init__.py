"""The ``mmcli`` command line: thin Typer commands over the library.

This is the only package that imports typer or rich.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mmcli import __version__
from mmcli.cli import evaluate, explain, predict, train
from mmcli.cli.common import setup_logging

app = typer.Typer(
    name="mmcli",
    help="MultiMix for chest radiographs: lung masks and pneumonia probabilities from one network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
) -> None:
    setup_logging(verbose)


app.command("train")(train.train)
app.command("predict")(predict.predict)
app.command("evaluate")(evaluate.evaluate)
app.command("explain")(explain.explain)


def main() -> None:
    """Console-script entry point."""
    app()
