"""Commands whose implementation has not landed yet: they say so and exit with 2."""

from __future__ import annotations

import typer

from mmcli.cli.common import console


def _not_yet(name: str) -> None:
    console.print(f"[bold red]Error:[/] `mmcli {name}` is not implemented yet in this version.")
    raise typer.Exit(2)


def train() -> None:
    """Train MultiMix semi-supervised from few labels (not implemented yet)."""
    _not_yet("train")


def evaluate() -> None:
    """Compute the paper's metrics (not implemented yet)."""
    _not_yet("evaluate")


def explain() -> None:
    """Write saliency maps (not implemented yet)."""
    _not_yet("explain")
