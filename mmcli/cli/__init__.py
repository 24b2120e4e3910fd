"""The ``mmcli`` command line: thin Typer commands over the library.

This is the only package that imports typer or rich.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core

from mmcli import __version__
from mmcli.cli import evaluate, explain, info, merge, predict, report, train
from mmcli.cli.common import setup_logging

if TYPE_CHECKING:
    from typer._click import Context as ClickContext  # the click that Typer vendors, as display_type_rich takes

# Typer prints Python annotations (<bool>, <list[str]>) as value placeholders. A flag takes no
# value, and every other option and argument here names its value (N, DIR). Typer builds its
# parameters itself, so mmcli's commands and group drop those placeholders from their own
# parameters as they are made (nothing outside mmcli's commands changes).
def _no_placeholder(ctx: ClickContext) -> str | None:
    return None


def _drop_placeholders(params: list[Any]) -> None:
    for param in params:
        flag = isinstance(param, typer.core.TyperOption) and (param.is_flag or param.count)
        named = isinstance(param, typer.core.TyperArgument) and param.metavar is not None
        if flag or named:
            param.display_type_rich = _no_placeholder  # this parameter's own; the class is untouched


def _reflow(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line: the help then wraps them to the terminal (Typer's rich help
    keeps a docstring's line breaks, which leaves ragged lines at 80 columns)."""
    def one(paragraph: str) -> str:  # click's \b blocks and indented lines keep their breaks
        if paragraph.startswith("\b") or any(line.startswith(" ") for line in paragraph.splitlines()):
            return paragraph
        return " ".join(paragraph.split())

    return None if text is None else "\n\n".join(one(p) for p in text.split("\n\n"))


class _Command(typer.core.TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: ClickContext) -> list[Any]:  # with --help, which click adds here
        params = super().get_params(ctx)
        _drop_placeholders(params)
        return params


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: ClickContext) -> list[Any]:
        params = super().get_params(ctx)
        _drop_placeholders(params)
        return params


app = typer.Typer(
    name="mmcli",
    cls=_Group,
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


app.command("train", cls=_Command)(train.train)
app.command("predict", cls=_Command)(predict.predict)
app.command("evaluate", cls=_Command)(evaluate.evaluate)
app.command("explain", cls=_Command)(explain.explain)
app.command("merge", cls=_Command)(merge.merge)
app.command("report", cls=_Command)(report.report)
app.command("info", cls=_Command)(info.info)


def main() -> None:
    """Console-script entry point."""
    app()
