"""``mmcli report``: a review page of a finished predict or explain run, opened without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmcli.cli.common import QuietOpt, Ticker, exit_on_error, say


def report(
    run: Annotated[
        Path,
        typer.Argument(metavar="RUN", show_default=False,
                       help="A finished predict or explain run: its report (results.csv, results.h5, "
                            "explain.csv) or its folder."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE", show_default=False,
                     help="Where the page goes (default: review.html in the run's folder)."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Write review.html: every case as a thumbnail with its lung outline, probability, label and QA flags.

    Sort and filter by label, QA flag and probability; each thumbnail links to a
    full-size overlay; failed cases are listed with their reasons. The page opens from
    the file system (no server, no network); its pictures go to review/ in the run's
    folder, drawn from the run's outputs (no model). Exit code 0, 2 on usage errors.
    """
    with exit_on_error():
        from mmcli.report import build_review, find_run, read_report

        found = find_run(run)
        with Ticker("report", len(read_report(found.report)), quiet=quiet) as ticker:
            summary = build_review(run, out, on_case=lambda _case: ticker.advance())
    if not quiet:
        missing = f", {summary.missing} without a picture" if summary.missing else ""
        say(f"{summary.cases} cases ({summary.failed} failed{missing}) -> {summary.page}")
