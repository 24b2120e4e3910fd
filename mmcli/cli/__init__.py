"""The ``mmcli`` command line: thin Typer commands over the library.

This is the only package that imports typer or rich.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mmcli import __version__
from mmcli.cli import predict, stubs
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


app.command("train", help="Train MultiMix semi-supervised from few labels.")(stubs.train)
app.command("predict")(predict.predict)
app.command("evaluate", help="Compute the paper's metrics against reference masks and labels.")(stubs.evaluate)
app.command("explain", help="Write saliency maps that show where the model looked.")(stubs.explain)


def main() -> None:
    """Console-script entry point."""
    app()
