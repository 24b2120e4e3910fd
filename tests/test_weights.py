import json

import pytest
import torch

import mmcli.weights as W
from mmcli.config import PreprocessConfig
from mmcli.errors import WeightsError
from mmcli.models import create_model, model_kwargs


def _ckpt(**over):
    kwargs = model_kwargs("multimix_tiny")
    model = create_model("multimix_tiny", **kwargs)
    return W.Checkpoint(
        model_name="multimix_tiny", model_kwargs=kwargs, state_dict=model.state_dict(),
        preprocess=PreprocessConfig(image_size=64), **over,
    ), model


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_rebuilds_same_model(tmp_path, suffix):
    ckpt, model = _ckpt(temperature=1.7, train_config={"seed": 3}, extra={"split_seed": 3})
    path = tmp_path / f"m{suffix}"
    sha = W.save_checkpoint(ckpt, path)
    loaded = W.load_checkpoint(path, expected_sha256=sha)
    assert loaded.sha256 == sha == W.file_sha256(path)
    assert loaded.preprocess == PreprocessConfig(image_size=64)
    assert loaded.temperature == 1.7 and loaded.train_config == {"seed": 3}
    assert loaded.class_names == ("normal", "pneumonia")
    rebuilt = loaded.build_model()
    assert not rebuilt.training
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x).seg_logits, model(x).seg_logits)


def test_sha_mismatch_is_refused(tmp_path):
    ckpt, _ = _ckpt()
    path = tmp_path / "m.safetensors"
    W.save_checkpoint(ckpt, path)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        W.load_checkpoint(path, expected_sha256="0" * 64)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_file_replaced_while_it_loads_gives_the_tensors_its_sha256_names(tmp_path, monkeypatch, suffix):
    from conftest import make_checkpoint

    path = make_checkpoint(tmp_path / f"w{suffix}", seed=0)
    other = make_checkpoint(tmp_path / f"other{suffix}", seed=1)
    first = W.load_checkpoint(path)
    expected = {k: v.clone() for k, v in first.state_dict.items()}
    real = W._read

    def replaced_after_the_hash(p, *args):
        path.write_bytes(other.read_bytes())  # another process rewrites the file now
        return real(p, *args)

    monkeypatch.setattr(W, "_read", replaced_after_the_hash)
    got = W.load_checkpoint(path, expected_sha256=first.sha256)
    assert got.sha256 == first.sha256
    assert all(torch.equal(got.state_dict[k], expected[k]) for k in expected)  # not the new file's
    # the loaded tensors are the process's own: rewriting the file in place later leaves them as they are
    path.write_bytes(make_checkpoint(tmp_path / f"third{suffix}", seed=2).read_bytes())
    assert all(torch.equal(got.state_dict[k], expected[k]) for k in expected)


def test_a_safetensors_header_that_lies_about_its_length_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b'{"__metadata__": {}}')
    with pytest.raises(WeightsError, match="cannot read checkpoint.*header of 1000000000 bytes"):
        W.load_checkpoint(bad)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        W.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(WeightsError, match="not an mmcli checkpoint"):
        W.load_checkpoint(foreign)
    with pytest.raises(WeightsError, match="not found"):
        W.load_checkpoint(tmp_path / "missing.pt")


def test_resolution_order(tmp_path, monkeypatch):
    ckpt, _ = _ckpt()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    W.save_checkpoint(ckpt, a)
    W.save_checkpoint(ckpt, b)
    monkeypatch.setattr(W, "WEIGHTS_DIRS", (tmp_path / "none",))
    monkeypatch.setenv(W.ENV_VAR, str(b))
    assert W.resolve_weights(str(a)) == (a, None)
    assert W.resolve_weights() == (b, None)
    monkeypatch.delenv(W.ENV_VAR)
    with pytest.raises(WeightsError, match="--weights PATH"):
        W.resolve_weights()


def test_registry_names_are_verified(tmp_path, monkeypatch):
    ckpt, _ = _ckpt()
    sha = W.save_checkpoint(ckpt, tmp_path / "tiny.safetensors")
    (tmp_path / "registry.json").write_text(json.dumps(
        {"default": "tiny", "weights": {"tiny": {"file": "tiny.safetensors", "sha256": sha}}}
    ))
    monkeypatch.setattr(W, "WEIGHTS_DIRS", (tmp_path,))
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    assert W.resolve_weights() == (tmp_path / "tiny.safetensors", sha)
    assert W.load_weights("tiny").sha256 == sha
    (tmp_path / "tiny.safetensors").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        W.load_weights()
