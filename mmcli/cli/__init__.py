"""The ``mmcli`` command line: thin Typer commands over the library.

This is the only package that imports typer or rich.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
import typer.core

from mmcli import __version__
from mmcli.cli import evaluate, explain, info, merge, predict, report, train
from mmcli.cli.common import setup_logging

if TYPE_CHECKING:
    from typer._click import Context as ClickContext  # the click that Typer vendors, as display_type_rich takes

# Typer prints Python annotations (<bool>, <list[str]>) as value placeholders. A flag takes no
# value, and every other option and argument here names its value (N, DIR). Typer builds its
# TyperOption and TyperArgument itself and takes no class of ours for them, so their
# display_type_rich is replaced, for the whole process, before any help is printed.
_OPTION_TYPE = typer.core.TyperOption.display_type_rich
_ARGUMENT_TYPE = typer.core.TyperArgument.display_type_rich


def _option_type(self: typer.core.TyperOption, ctx: ClickContext) -> str | None:
    return None if self.is_flag or self.count else _OPTION_TYPE(self, ctx)


def _argument_type(self: typer.core.TyperArgument, ctx: ClickContext) -> str | None:
    return None if self.metavar is not None else _ARGUMENT_TYPE(self, ctx)


typer.core.TyperOption.display_type_rich = _option_type  # type: ignore[method-assign]
# assignment: Typer declares the method on its private base class, whose self is any parameter
typer.core.TyperArgument.display_type_rich = _argument_type  # type: ignore[method-assign, assignment]

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
app.command("merge")(merge.merge)
app.command("report")(report.report)
app.command("info")(info.info)


def main() -> None:
    """Console-script entry point."""
    app()
