"""Find, verify and load self-describing checkpoints.

A checkpoint carries everything needed to rebuild its model: the registry name and
kwargs, the preprocessing, the class names, the calibration temperature, the mmcli
version and, for trained models, the training configuration. Model weights are stored
as safetensors (the metadata holds that description as JSON); ``.pt`` files are read
with ``torch.load(weights_only=True)``. Nothing is ever unpickled from an untrusted file.

Lookup order for the weights of a command: ``--weights`` (a path or a name in
``weights/registry.json``), then the ``MMCLI_WEIGHTS`` environment variable, then the
registry's default. Files named through the registry are verified by sha256.

Every checkpoint is checked on load (:func:`validate_description`, :func:`validate_tensors`)
before a model is built from it, and refused with one line naming the file and the reason.
Outputs name weights by :func:`weights_name`: a registered name only for the registered
bytes, else ``sha256:`` and the first 12 hex digits of the file's own sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from mmcli import __version__
from mmcli.config import CLASS_NAMES, PreprocessConfig
from mmcli.errors import WeightsError
from mmcli.io.identity import file_sha256
from mmcli.io.writers import atomic_path
from mmcli.models import MultiMix, create_model, list_models, model_kwargs

logger = logging.getLogger(__name__)

ENV_VAR = "MMCLI_WEIGHTS"
_META_KEY = "mmcli"
_TENSOR_PREFIX = "_extra."  # tensors that describe the model (e.g. OOD statistics), not its weights
_PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIRS: tuple[Path, ...] = (_PACKAGE_DIR / "_weights", _PACKAGE_DIR.parent / "weights")
HOW_TO_GET_WEIGHTS = (
    "pass --weights PATH (a checkpoint made by `mmcli train`), or set the "
    f"{ENV_VAR} environment variable to one"
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model description plus its weights."""

    model_name: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    class_names: tuple[str, ...] = CLASS_NAMES
    temperature: float = 1.0
    mmcli_version: str = __version__
    train_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trained_image_size: int | None = None  # None: the preprocessing's (what a new checkpoint declares)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The JSON-serialisable description stored beside the tensors."""
        return {
            "format": 1,
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "preprocess": self.preprocess.to_dict(),
            "class_names": list(self.class_names),
            "temperature": self.temperature,
            "mmcli_version": self.mmcli_version,
            "train_config": self.train_config,
            "extra": self.extra,
            "trained_image_size": self.trained_image_size or self.preprocess.image_size,
        }

    def build_model(self) -> MultiMix:
        """Rebuild the model from its description and load the weights (eval mode)."""
        model = create_model(self.model_name, **self.model_kwargs)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"{self.path or 'checkpoint'}: weights do not fit model {self.model_name!r} "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return model.eval()


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 1024
"""The model input sizes a checkpoint may declare (a larger one costs memory quadratically)."""
TEMPERATURE_RANGE = (0.05, 20.0)
"""Calibration temperatures a checkpoint may hold, both ends excluded: calibration fits within
(0.2, 5); a temperature near 0 turns every probability into 0 or 1, a huge one into 1/C."""


def validate_description(ckpt: Checkpoint) -> None:
    """Check a checkpoint's description before anything is built from it (nothing is allocated).

    Raises:
        WeightsError: an unknown model or model argument, model arguments out of bounds
            (:func:`mmcli.models.model_kwargs` builds the model on the meta device), a model
            that does not take one grey channel or has not one output per class; a
            temperature that is not a finite number inside :data:`TEMPERATURE_RANGE`; an
            image size outside 64..1024 or other than the one the weights were trained at, a
            normalisation that is not finite; class names other than
            :data:`mmcli.config.CLASS_NAMES`, in that order.
    """
    where = ckpt.path or "checkpoint"
    if ckpt.model_name not in list_models():
        raise WeightsError(f"{where}: unknown model {ckpt.model_name!r} (known: {', '.join(list_models())})")
    try:
        kwargs = model_kwargs(ckpt.model_name, **ckpt.model_kwargs)  # on the meta device: nothing is allocated
    except TypeError as err:
        raise WeightsError(f"{where}: model arguments {sorted(ckpt.model_kwargs)} do not fit model "
                           f"{ckpt.model_name!r}: {err}") from None
    except ValueError as err:
        raise WeightsError(f"{where}: invalid model arguments for {ckpt.model_name!r}: {err}") from None
    if kwargs.get("in_chans", 1) != 1:
        raise WeightsError(f"{where}: the model takes {kwargs['in_chans']} input channels; mmcli feeds it grey images")
    t, (t_low, t_high) = ckpt.temperature, TEMPERATURE_RANGE
    if not (math.isfinite(t) and t > 0):
        raise WeightsError(f"{where}: calibration temperature must be a finite number > 0, got {t}")
    if not t_low < t < t_high:
        raise WeightsError(f"{where}: calibration temperature {t} is outside {t_low}..{t_high} (it would push "
                           "every probability to 0 or 1, or to 0.5)")
    size = ckpt.preprocess.image_size
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise WeightsError(f"{where}: model image size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if not (math.isfinite(ckpt.preprocess.mean) and math.isfinite(ckpt.preprocess.std)):
        raise WeightsError(f"{where}: preprocessing mean {ckpt.preprocess.mean} and std {ckpt.preprocess.std} "
                           "must be finite numbers")
    trained = ckpt.trained_image_size
    if trained is not None and trained != size:
        raise WeightsError(f"{where}: preprocessing image size {size} is not the {trained} the weights were "
                           "trained at")
    if tuple(ckpt.class_names) != CLASS_NAMES:
        raise WeightsError(f"{where}: class names {list(ckpt.class_names)} are not mmcli's {list(CLASS_NAMES)} "
                           "in that order (other names or another order would rename or swap the labels)")
    if kwargs.get("cls_head", True) and kwargs.get("num_classes") != len(CLASS_NAMES):
        raise WeightsError(f"{where}: the classifier has {kwargs.get('num_classes')} outputs for "
                           f"{len(CLASS_NAMES)} classes")


def validate_tensors(ckpt: Checkpoint) -> None:
    """Check that the weights fit the described model, shape by shape, and that every tensor is finite.

    The model is built on the meta device for its shapes, so nothing is allocated.

    Raises:
        WeightsError: a missing, unexpected or misshapen weight, or a NaN or infinite value.
    """
    where = ckpt.path or "checkpoint"
    if not all(isinstance(v, torch.Tensor) for v in [*ckpt.state_dict.values(), *ckpt.tensors.values()]):
        raise WeightsError(f"{where}: not an mmcli checkpoint (its weights are not all tensors)")
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in create_model(ckpt.model_name, **ckpt.model_kwargs).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    missing, unexpected = sorted(wanted.keys() - got.keys()), sorted(got.keys() - wanted.keys())
    if missing or unexpected:
        raise WeightsError(f"{where}: weights do not fit model {ckpt.model_name!r} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k in wanted if wanted[k] != got[k]]
    if wrong:
        raise WeightsError(f"{where}: weights do not fit model {ckpt.model_name!r} ({len(wrong)} of another "
                           f"shape, first {wrong[0]}: {list(got[wrong[0]])} instead of {list(wanted[wrong[0]])})")
    for name, tensor in [*ckpt.state_dict.items(), *ckpt.tensors.items()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{where}: tensor {name!r} holds NaN or infinite values")


def _trained_image_size(meta: dict[str, Any]) -> int | None:
    """The image size the weights were trained at: recorded, else the training configuration's, else unknown."""
    size = meta.get("trained_image_size")
    if size is None and isinstance(meta.get("train_config"), dict):
        size = meta["train_config"].get("image_size")
    return None if size is None else int(size)


def _from_metadata(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> Checkpoint:
    try:
        return Checkpoint(
            model_name=meta["model_name"],
            model_kwargs={k: _as_tuple(v) for k, v in meta.get("model_kwargs", {}).items()},
            state_dict=state,
            preprocess=PreprocessConfig.from_dict(meta.get("preprocess", {})),
            class_names=tuple(meta.get("class_names", CLASS_NAMES)),
            temperature=float(meta.get("temperature", 1.0)),
            mmcli_version=str(meta.get("mmcli_version", "unknown")),
            train_config=meta.get("train_config"),
            extra=dict(meta.get("extra") or {}),
            trained_image_size=_trained_image_size(meta),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise WeightsError(f"checkpoint description is incomplete or invalid: {err}") from err


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> str:
    """Write ``ckpt`` as safetensors (``.safetensors``) or a weights-only ``.pt``.

    The file is written atomically (:func:`mmcli.io.writers.atomic_path`), so a crash never
    leaves a half-written checkpoint. Returns the file's sha256.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()}
    state.update({_TENSOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()})
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(state, str(tmp), metadata={_META_KEY: json.dumps(ckpt.metadata())})
        else:
            torch.save({_META_KEY: ckpt.metadata(), "state_dict": state}, tmp)
    return file_sha256(path)


def load_checkpoint(path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> Checkpoint:
    """Load a checkpoint safely, verifying its sha256 when one is expected.

    The file is read once: the sha256 is that of the very bytes the checkpoint is built
    from, so a file replaced while it loads cannot pass under the old hash. The description
    is checked (:func:`validate_description`) before the tensors of a safetensors file are
    decoded, and the tensors (:func:`validate_tensors`) before anything is built from them.

    Raises:
        WeightsError: one line naming the file and why it cannot be used.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WeightsError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256.lower():
        raise WeightsError(
            f"{path}: sha256 mismatch (expected {expected_sha256}, got {sha}); "
            "the file is corrupt or was replaced"
        )
    ckpt = _read(path, data)
    ckpt.path, ckpt.sha256 = path, sha
    validate_description(ckpt)
    state = _read_tensors(path, data) if path.suffix == ".safetensors" else ckpt.state_dict
    ckpt.tensors = {k[len(_TENSOR_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(_TENSOR_PREFIX)]}
    ckpt.state_dict = state
    validate_tensors(ckpt)
    return ckpt


def _read(path: Path, data: bytes) -> Checkpoint:
    """The checkpoint's description from the file's bytes ``data``; with its tensors for a ``.pt``
    file (a safetensors file's come later)."""
    try:
        if path.suffix == ".safetensors":
            raw_meta = (_safetensors_header(data).get("__metadata__") or {}).get(_META_KEY)
            if raw_meta is None:
                raise WeightsError(f"{path}: not an mmcli checkpoint (no '{_META_KEY}' metadata)")
            meta, state = json.loads(raw_meta), {}
        else:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or _META_KEY not in blob:
                raise WeightsError(f"{path}: not an mmcli checkpoint (no '{_META_KEY}' entry)")
            meta, state = blob[_META_KEY], dict(blob["state_dict"])
        if not isinstance(meta, dict):
            raise WeightsError(f"{path}: not an mmcli checkpoint (its description is not a JSON object)")
    except WeightsError:
        raise
    except Exception as err:  # safetensors/pickle raise many types for a bad file
        raise WeightsError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    try:
        return _from_metadata(meta, state)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None


def _safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then that many bytes."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(data)}")
    header = json.loads(data[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors raises many types for a bad file
        raise WeightsError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err


def read_registry() -> tuple[Path, dict[str, Any]] | None:
    """The first ``registry.json`` found in the weights folders, with its folder."""
    for folder in WEIGHTS_DIRS:
        reg = folder / "registry.json"
        if reg.is_file():
            return folder, json.loads(reg.read_text())
    return None


def resolve_weights(weights: str | os.PathLike[str] | None = None) -> tuple[Path, str | None]:
    """Find the weights to use: ``weights``, then ``$MMCLI_WEIGHTS``, then the default.

    Returns:
        The file and the sha256 it must have (``None`` for a file named by path).

    Raises:
        WeightsError: with a one-line explanation of how to get or pass weights.
    """
    choice = weights if weights is not None else os.environ.get(ENV_VAR) or None
    found = read_registry()
    entries: dict[str, Any] = found[1].get("weights", {}) if found else {}
    if choice is None:
        default = found[1].get("default") if found else None
        if not default:
            raise WeightsError(f"No default weights are installed: {HOW_TO_GET_WEIGHTS}.")
        choice = default
    name = str(choice)
    if name in entries and found is not None:
        entry = entries[name]
        return found[0] / entry["file"], entry.get("sha256")
    path = Path(choice).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(entries)) or "none"
        raise WeightsError(
            f"Weights {name!r} are neither a file nor a registered name (registered: {known}): "
            f"{HOW_TO_GET_WEIGHTS}."
        )
    return path, None


def weights_name(ckpt: Checkpoint) -> str:
    """How outputs name a checkpoint: its registered name when its bytes are the registered file's
    (same sha256), else ``sha256:`` and the first 12 hex digits of its own sha256.

    A file's name or path says nothing of what it holds; its sha256 does (the full digest
    is recorded beside the name as ``weights_sha256``).
    """
    if ckpt.sha256 is None:  # never written to a file
        return f"unsaved {ckpt.model_name}"
    found = read_registry()
    if found is not None:
        for name, entry in found[1].get("weights", {}).items():
            if str(entry.get("sha256", "")).lower() == ckpt.sha256:
                return str(name)
    return f"sha256:{ckpt.sha256[:12]}"


def load_weights(weights: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Resolve (see :func:`resolve_weights`), verify and load a checkpoint."""
    path, sha = resolve_weights(weights)
    return load_checkpoint(path, expected_sha256=sha)
