import json

import torch
from typer.testing import CliRunner

from mmcli import __version__
from mmcli.cli import app
from mmcli.weights import file_sha256, read_registry

runner = CliRunner()


def test_info_json_says_what_a_run_would_use():
    res = runner.invoke(app, ["info", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["mmcli_version"] == __version__ and data["torch"] == torch.__version__
    folder, registry = read_registry()
    (default,) = [w for w in data["weights"]["registered"] if w["default"]]
    assert default["name"] == registry["default"] == data["weights"]["default"]
    entry = registry["weights"][default["name"]]
    assert default["present"] and default["sha256"] == file_sha256(folder / entry["file"]) == entry["sha256"]
    assert data["devices"][0]["device"] == "cpu" and data["devices"][0]["cores"] >= 1
    if not torch.cuda.is_available():
        precision = "mixed" if data["devices"][0]["fast_bf16"] else "fp32"
        assert data["auto"] == {"device": "cpu", "precision": precision, "workers": data["devices"][0]["cores"]}
    assert data["dicom_decoders"]["JPEG 2000"] is True and data["dicom_decoders"]["JPEG lossless"] is True


def test_info_for_people_is_short_and_plain():
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"mmcli {__version__} ")
    assert any(line.startswith("auto: device ") for line in lines)
    assert any("default, present" in line for line in lines)
    (devices,) = [line for line in lines if line.startswith("devices: ")]
    cpu = json.loads(runner.invoke(app, ["info", "--json"]).stdout)["devices"][0]
    native = "native" if cpu["fast_bf16"] else "no native"
    assert devices.startswith("devices: cpu (") and f", {native} bf16)" in devices
