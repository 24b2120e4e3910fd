"""Shared fixtures: a tiny random checkpoint and a folder of small radiographs, made in tmp_path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from mmcli.config import PreprocessConfig
from mmcli.models import create_model, model_kwargs
from mmcli.weights import Checkpoint, save_checkpoint

DATA = Path(__file__).parent / "data"


def make_checkpoint(path: Path, seed: int = 0, image_size: int = 64) -> Path:
    torch.manual_seed(seed)
    kwargs = model_kwargs("multimix_tiny")
    model = create_model("multimix_tiny", **kwargs)
    ckpt = Checkpoint(
        model_name="multimix_tiny", model_kwargs=kwargs, state_dict=model.state_dict(),
        preprocess=PreprocessConfig(image_size=image_size),
    )
    save_checkpoint(ckpt, path)
    return path


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (registered, so the scripts can import each other)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def radiograph_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grey image in [0, 1] with two dark 'lungs', ``(H, W)`` float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    img = 0.8 - 0.5 * (np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.02)
                       + np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.02))
    img += 0.02 * rng.standard_normal((height, width))
    return np.clip(img, 0, 1).astype(np.float32)


def save_png8(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((radiograph_like(height, width, seed) * 255).astype(np.uint8)).save(path)
    return path


def save_png16(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((radiograph_like(height, width, seed) * 65535).astype(np.uint16)).save(path)
    return path


@pytest.fixture()
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
