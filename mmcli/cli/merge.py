"""``mmcli merge``: join the reports of a sharded ``predict`` run into one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mmcli.cli.common import QuietOpt, ReportOutOpt, exit_on_error, say


def merge(
    reports: Annotated[
        list[Path],
        typer.Argument(metavar="REPORT", show_default=False,
                       help="The shard reports of one run: <out>.shard-K-of-N.csv (or .h5), all N of them."),
    ],
    out: ReportOutOpt,
    quiet: QuietOpt = False,
) -> None:
    """Merge the shard reports of `mmcli predict --shard K/N` into one report.

    The merged report, its masks (<out>/masks/) and run.json are what a single run over
    all inputs writes. Everything is checked before anything is written: shards made with
    other weights or settings or from another input list are refused, missing shards are
    named, and so is a shard that lacks a case or holds one twice, or names a file outside
    its own folder. Exit code 0 on success, 2 on a refusal, 1 when writing fails.
    """
    with exit_on_error():
        from mmcli.merge import merge_reports
        from mmcli.predict import FILE_COLUMNS, REPORT_COLUMNS

        summary = merge_reports(reports, out, columns=REPORT_COLUMNS, file_columns=FILE_COLUMNS, command=sys.argv)
    if not quiet:
        c = summary.counts
        say(f"{summary.shards} shards: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped "
            f"-> {summary.report}")
