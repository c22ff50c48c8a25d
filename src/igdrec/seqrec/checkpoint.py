"""A recommender on disk: its weights as safetensors (loading them runs no code) and its shape as JSON.

    save_recommender(model, directory, "sasrec", max_len, settings)   # model.safetensors + model.json
    model, max_len = load_recommender(directory, device)              # in eval mode, ready for full_sort_predict

What a loaded model scores for a history is what the saved one scored: D3's text-free assistant runs it
batch by batch inside `decode` instead of reading per-sample probabilities from disk (docs/method.md §6.4).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from igdrec.config import BASELINE_MODELS
from igdrec.errors import IgdrecError
from igdrec.seqrec.models import ModelSettings, SequentialRecommender, build_model

WEIGHTS = "model.safetensors"
SETTINGS = "model.json"


def save_recommender(model: SequentialRecommender, directory: Path, name: str, max_len: int, settings: ModelSettings) -> None:
    """Write `model`'s state (parameters and buffers) and what rebuilding it takes into `directory`."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(directory / WEIGHTS))
    shape = {"model": name, "n_items": model.n_items, "max_len": max_len, "settings": asdict(settings.resolved(name))}
    (directory / SETTINGS).write_text(json.dumps(shape, indent=2) + "\n")


def load_recommender(directory: Path, device: torch.device | str = "cpu") -> tuple[SequentialRecommender, int]:
    """The model saved in `directory` (eval mode, on `device`) and the history length it was built for;
    a one-line IgdrecError naming the file for anything that does not rebuild exactly."""
    shape = _read_shape(directory / SETTINGS)
    settings = ModelSettings(**shape["settings"])
    try:  # most-popular's counts are a buffer in the weights file: the train targets only size it
        model = build_model(shape["model"], shape["n_items"], shape["max_len"], settings, np.zeros(0, dtype=np.int64))
    except (ValueError, RuntimeError) as exc:
        raise IgdrecError(f"{directory / SETTINGS}: cannot build a {shape['model']} of these settings ({exc})") from exc
    path = directory / WEIGHTS
    try:
        state = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise IgdrecError(f"{path}: cannot read the model's weights ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise IgdrecError(f"{path}: the weights do not fit a {shape['model']} of the shape in {SETTINGS} ({reason})") from exc
    model.to(device)
    model.eval()
    return model, shape["max_len"]


def _read_shape(path: Path) -> dict:
    try:
        shape = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IgdrecError(f"{path}: cannot read the model's settings ({exc})") from exc
    if not isinstance(shape, dict) or set(shape) != {"model", "n_items", "max_len", "settings"}:
        raise IgdrecError(f"{path}: expected an object with exactly the keys model, n_items, max_len, settings")
    if shape["model"] not in BASELINE_MODELS:
        raise IgdrecError(f"{path}: model {shape['model']!r} is not one of {', '.join(BASELINE_MODELS)}")
    for key in ("n_items", "max_len"):
        if type(shape[key]) is not int or shape[key] < 1:
            raise IgdrecError(f"{path}: {key} {shape[key]!r} is not a positive integer")
    settings, known = shape["settings"], {f.name: f for f in fields(ModelSettings)}
    if not isinstance(settings, dict) or set(settings) != set(known):
        raise IgdrecError(f"{path}: settings must hold exactly {', '.join(known)}")
    for key, value in settings.items():
        kind = (int,) if known[key].type.startswith("int") else (int, float)  # the annotation, as a string
        if not (value is None and "None" in known[key].type) and type(value) not in kind:
            raise IgdrecError(f"{path}: settings.{key} {value!r} is not {'an integer' if kind == (int,) else 'a number'}")
    return shape
