"""Checkpoints: weights in safetensors (never pickle), a readable JSON beside them, and
the optimizer state in a separate safetensors + JSON pair; every file written atomically.

A run directory holds ``model.safetensors`` (self-describing: the model config and
epoch are in its header), ``model.json`` (the same facts plus dataset and training
settings, for people and tools) and ``train_state.safetensors``/``.json`` (Adam state).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hahnet.config import ModelConfig
from hahnet.io import DamagedFileError, atomic_write, read_json, sha256_file, write_json
from hahnet.nn.models import MODEL_CLASSES, build_model
from hahnet.training.rundir import INFO_FILE, MODEL_FILE, SNAPSHOT_DIR, sidecar, snapshot_path

STATE_FILE = "train_state.safetensors"
STATE_INFO_FILE = "train_state.json"
FORMAT = "hahnet-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, inconsistent or for another model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _contiguous_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model(run_dir: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """Write the weights and their description (``info`` gains model config and format)."""
    plain = unwrap(model)
    if not isinstance(plain, MODEL_CLASSES):
        raise TypeError(f"save_model expects a model of hahnet.create_model, got "
                        f"{type(plain).__name__}")
    info = {"format": FORMAT, "model": plain.config.to_dict(), **info}
    header = {"hahnet": json.dumps(info)}
    run_dir = Path(run_dir)
    atomic_write(run_dir / MODEL_FILE,
                 lambda tmp: save_file(_contiguous_state(plain), str(tmp), metadata=header))
    seal(run_dir / MODEL_FILE, info)


def seal(file: str | Path, info: dict[str, Any] | None = None) -> str:
    """Record ``file``'s SHA-256 in its sidecar JSON, written from ``info`` (or, when None,
    the sidecar's own contents); returns the checksum. Every save does this; call it on a
    checkpoint saved without a checksum once you trust its bytes."""
    file = Path(file)
    described = sidecar(file)
    if info is None:
        try:
            info = read_json(described) if described.exists() else {}
        except DamagedFileError as error:
            raise CheckpointError(str(error)) from None
    digest = sha256_file(file)
    write_json(described, {**info, "sha256": digest})
    return digest


def check_sha256(file: str | Path) -> None:
    """Check a .safetensors file against the SHA-256 its sidecar JSON records: a mismatch
    is a :class:`CheckpointError`; a file with no recorded checksum (saved before they
    were recorded, or without its sidecar) is used, with one warning line naming it."""
    file = Path(file)
    described = sidecar(file)
    record: Any = None
    if described.exists():
        try:
            record = read_json(described)
        except DamagedFileError as error:
            raise CheckpointError(str(error)) from None
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not expected:
        print(f"hahnet: warning: {file} has no recorded SHA-256 ({described.name}), so it is "
              f"used unchecked; once you trust it, record one with "
              f"hahnet.training.checkpoint.seal('{file}')", file=sys.stderr)
    elif expected != sha256_file(file):
        raise CheckpointError(f"{file} is damaged: its SHA-256 differs from the one recorded in "
                              f"{described.name} when it was saved; restore the file or train again")


def resolve(path: str | Path) -> Path:
    """A checkpoint file from ``RUN_DIR``, a ``.safetensors`` file or ``RUN_DIR@EPOCH``
    (the snapshot after that 1-based epoch, or the final weights if that is their epoch)."""
    text = str(path)
    if "@" not in text or Path(text).exists():
        return _model_file(Path(text))
    run, _, epoch_text = text.rpartition("@")
    if not epoch_text.isdigit() or int(epoch_text) < 1:
        raise CheckpointError(f"{text}: expected RUN_DIR@EPOCH with a 1-based epoch number, "
                              f"e.g. runs/x@10")
    epoch = int(epoch_text)
    snapshot = snapshot_path(run, epoch)
    if snapshot.exists():
        return snapshot
    final = Path(run) / MODEL_FILE
    if final.exists() and _read_header(final).get("epoch") == epoch - 1:
        return final
    kept = sorted(int(p.stem[5:]) for p in (Path(run) / SNAPSHOT_DIR).glob("epoch*.safetensors")
                  if p.stem[5:].isdigit())
    raise CheckpointError(f"{text}: no weights after epoch {epoch} in {run} (snapshots kept: "
                          f"{kept or 'none'}); train with --snapshots {epoch} or pick one of those")


def _model_file(path: Path) -> Path:
    path = Path(path)
    if "@" in path.name and not path.exists():
        return resolve(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory holding "
                              f"{MODEL_FILE} or the .safetensors file itself")
    return path


def _read_header(file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {file}: truncated or corrupt "
                              f"safetensors file ({error}); re-save or re-train it") from None
    if "hahnet" not in metadata:
        raise CheckpointError(f"{file} is a safetensors file but not a hahnet checkpoint "
                              f"(no 'hahnet' header); save it with hahnet")
    try:
        info = json.loads(metadata["hahnet"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is damaged: its hahnet header is not valid JSON "
                              f"({error}); restore the file or train again") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise CheckpointError(f"{file} is damaged: its hahnet header has no model config; "
                              f"restore the file or train again")
    return info


def read_info(path: str | Path) -> dict[str, Any]:
    """The checkpoint's description: model config, dataset, epoch, training settings."""
    return _read_header(_model_file(Path(path)))


def load_weights(model: nn.Module, path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (checking it is the same model, and with
    ``verify`` its SHA-256, see :func:`check_sha256`); returns the checkpoint's info."""
    file = _model_file(Path(path))
    info = _read_header(file)
    if verify:
        check_sha256(file)
    plain = unwrap(model)
    saved = ModelConfig.from_dict(info["model"])
    if isinstance(plain, MODEL_CLASSES) and saved != plain.config:
        diff = {k: (v, getattr(plain.config, k)) for k, v in saved.to_dict().items()
                if v != getattr(plain.config, k)}
        raise CheckpointError(f"checkpoint {file} is for another model: (saved, requested) "
                              f"differ in {diff}; rebuild the model from the checkpoint "
                              f"(hahnet.load) or use matching options")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {file}: truncated or corrupt ({error})") from None
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(f"checkpoint {file} does not fit this model: "
                              f"{' '.join(first[:2])[:300]}") from None
    return info


def load(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """A ready model from a checkpoint (``RUN_DIR``, a .safetensors file or ``RUN_DIR@EPOCH``),
    in eval mode: the registered network its header names (``model.arch``), with its weights.
    ``verify`` (default): check the weights against the SHA-256 recorded in the JSON beside
    them; a damaged file is a :class:`CheckpointError`, and one saved without a checksum
    loads with a one-line warning naming it. ``verify=False`` skips both."""
    info = read_info(path)
    try:
        config = ModelConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has an unusable model config: {error}") from None
    model = build_model(config)
    load_weights(model, path, verify)
    return model.to(device).eval()


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Optimizer tensors to safetensors, its settings and ``info`` (epoch...) to JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    run_dir = Path(run_dir)
    atomic_write(run_dir / STATE_FILE,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"epoch": str(info["epoch"])}))
    seal(run_dir / STATE_FILE, {**info, "param_groups": state["param_groups"], "scalars": scalars})


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer saved by :func:`save_train_state`; returns the saved info."""
    run_dir = Path(run_dir)
    for name in (STATE_FILE, STATE_INFO_FILE):
        if not (run_dir / name).exists():
            raise CheckpointError(f"cannot resume from {run_dir}: {name} is missing; "
                                  f"start a fresh run instead")
    check_sha256(run_dir / STATE_FILE)
    try:
        info = read_json(run_dir / STATE_INFO_FILE)
        tensors = load_file(str(run_dir / STATE_FILE))
    except (SafetensorError, OSError, DamagedFileError) as error:
        raise CheckpointError(f"cannot resume from {run_dir}: training state is corrupt ({error})") from None
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    for index, extra in info["scalars"].items():
        slots.setdefault(int(index), {}).update(extra)
    groups = info["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"cannot resume from {run_dir}: optimizer state does not fit "
                              f"this model ({error})") from None
    return info
