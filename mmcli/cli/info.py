"""``mmcli info``: what this installation would run with, for people and for batch scripts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from mmcli.cli.common import exit_on_error


def info(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for scripts.")] = False,
) -> None:
    """Show the version, registered weights, torch, devices, what auto picks, and DICOM decoders."""
    with exit_on_error():
        from mmcli.info import gather_info  # torch: only once the command runs

        data = gather_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    auto = data["auto"]
    lines = [
        f"mmcli {data['mmcli_version']} (Python {data['python']}, torch {data['torch']}, {data['platform']})",
        f"auto: device {auto['device']}, precision {auto['precision']}, {auto['workers']} worker(s)",
        "devices: " + ", ".join(f"{d['device']} ({d['name']}{_bf16(d)})" for d in data["devices"]),
        f"weights ({data['weights']['folder'] or 'no registry found'}):",
    ]
    for w in data["weights"]["registered"]:
        flags = ", ".join(f for f in ("default" if w["default"] else "", "present" if w["present"] else "MISSING") if f)
        lines.append(f"  {w['name']}: {flags}; sha256 {w['sha256']}; {w['use'] or ''}".rstrip("; "))
    decoders = data["dicom_decoders"].items()
    lines.append("DICOM decoders: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in decoders))
    typer.echo("\n".join(lines))


def _bf16(device: dict[str, Any]) -> str:
    native = device.get("fast_bf16")
    return "" if native is None else f", {'native' if native else 'no native'} bf16"
