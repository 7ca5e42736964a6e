"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A run folder holds ``checkpoints/step-NNNNNNNN/`` folders and a ``latest`` file naming the newest
complete one. A checkpoint is written to a temporary folder and renamed into place before ``latest``
is replaced (both atomic), so a run killed at any moment resumes from its last complete checkpoint.

Files of one checkpoint: ``model.safetensors`` (model weights, plus ``ema.*`` for the EMA teacher),
``optimizer.safetensors`` (optimiser tensors) and ``state.json`` (config, tokenizer spec, step,
training arguments, optimiser scalars and param groups, data hash, versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from imadarem.runtime.errors import CheckpointError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = "imadarem-checkpoint-1"
EMA_PREFIX = "ema."


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, state: dict[str, Any],
                    keep: int = 2, ema=None) -> Path:
    """Write a complete checkpoint for ``step`` (the model, its EMA weights as ``ema.*``) and point
    ``latest`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        weights.update({EMA_PREFIX + k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    full_state = dict(state, step=step, format=CHECKPOINT_FORMAT, optimizer=opt_meta)
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = Path(run_dir) / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, Path(run_dir) / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder (its ``latest``) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        path = path / "checkpoints" / name
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not an Imadarem checkpoint (state.json and model.safetensors expected)")
    return path


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model_weights(self, which: str = "raw") -> dict[str, torch.Tensor]:
        if which == "ema":
            ema = {k[len(EMA_PREFIX):]: v for k, v in self.weights.items() if k.startswith(EMA_PREFIX)}
            if not ema:
                raise CheckpointError(f"{self.path} holds no EMA weights; use --weights raw")
            return ema
        if which != "raw":
            raise CheckpointError(f"--weights must be 'ema' or 'raw', got {which!r}")
        return {k: v for k, v in self.weights.items() if not k.startswith(EMA_PREFIX)}

    def optimizer_state(self) -> dict[str, Any]:
        try:
            tensors = load_file(str(self.path / "optimizer.safetensors"))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{self.path}: optimizer state unreadable ({exc})") from None
        return _unflatten_optimizer(tensors, self.state["optimizer"])

    def file_hash(self) -> str:
        digest = hashlib.sha256()
        for name in ("model.safetensors", "state.json"):
            digest.update((self.path / name).read_bytes())
        return digest.hexdigest()


def read_state(ckpt: Path) -> dict[str, Any]:
    """A resolved checkpoint's ``state.json``, checked (no weights read: cheap)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}/state.json is unreadable or corrupt ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{ckpt}: unknown checkpoint format {state.get('format') if isinstance(state, dict) else None!r}")
    for key in ("config", "tokenizer", "step"):
        if key not in state:
            raise CheckpointError(f"{ckpt}/state.json lacks {key!r}")
    return state


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}/model.safetensors is unreadable or corrupt ({str(exc).splitlines()[0]})") from None
    return LoadedCheckpoint(ckpt, state, weights)


def family_name(state: dict[str, Any]) -> str:
    """A checkpoint state's model family (checkpoints from before the families are Imadarem V's, ``refine``)."""
    return state.get("family", "refine")


def family_of(ckpt: LoadedCheckpoint):
    from imadarem.training.families import get_family

    return get_family(family_name(ckpt.state))


def build_model(ckpt: LoadedCheckpoint, weights: str = "raw"):
    """The checkpoint's model (its family's class) with its config, tokenizer and chosen weights."""
    from imadarem.runtime.errors import ImadaremError
    from imadarem.runtime.registry import tokenizer_from_json

    family = family_of(ckpt)
    try:
        config = family.config_from_dict(ckpt.state["config"])
        tokenizer = tokenizer_from_json(ckpt.state["tokenizer"])
    except ImadaremError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from None
    model = family.build(config, tokenizer)
    try:
        model.load_state_dict(ckpt.model_weights(weights))
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the stored config ({str(exc).splitlines()[0]})") from None
    return model
