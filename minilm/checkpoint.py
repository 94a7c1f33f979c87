"""The run directory: what a training run leaves on disk, written atomically.

    runs/NAME/
      config.json          model architecture (ModelConfig)
      train_config.json    every flag of the run
      tokenizer/           SentencePiece model + special-token map
      model.safetensors    final weights          best.safetensors   best by validation
      state/               resume: weights, optimizer, scaler, RNG, step  (trainer.pt + model.safetensors)
      metrics.jsonl        one JSON object per logged step
      summary.json         final metrics, tokens seen, wall time, versions
      loss.png             curves (when matplotlib is installed)

Weights are safetensors (no pickle, so loading a downloaded run cannot run code); the
optimizer and RNG state use torch.save and are read back with weights_only=True.
The weights, the JSON files and the resume state are written to a temporary name and renamed
into place, so an interrupted write never leaves a half file that looks valid (metrics.jsonl
is appended to, one line per log step; a damaged JSON or weights file is reported by name).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.model import HEADS, PreTrained


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# A run directory's two sets of weights: after the last step, and at the best validation score
Weights = Literal["final", "best"]
WEIGHT_FILES: dict[str, str] = {"final": "model.safetensors", "best": "best.safetensors"}


def read_json(path: Path) -> Any:
    """A JSON file of a run directory; a damaged one is a one-line error that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MinilmError(f"{path} is damaged: not valid JSON ({err})") from err


def save_weights(model: PreTrained, path: Path) -> None:
    """safetensors; tied matrices are stored once and re-tied on load."""
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def first_line(err: BaseException) -> str:
    """An exception's first line, for a one-line error (its class when it has no message:
    torch.load of an empty file raises a bare EOFError)."""
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def load_weights(model: PreTrained, path: Path) -> PreTrained:
    """Every tensor of `model` from `path`, and nothing else: a mismatch is a user error (the
    file belongs to another architecture), reported by safetensors as missing/unexpected keys."""
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise MinilmError(f"{path} is damaged: not a complete safetensors file ({err})") from err
    except RuntimeError as err:
        raise MinilmError(f"{path} does not fit the model of its config.json ({first_line(err)})") from err
    return model


def head_of(model: PreTrained) -> str:
    return next(name for name, cls in HEADS.items() if type(model) is cls)


def save_model_dir(model: PreTrained, directory: Path, weights_name: str = "model.safetensors") -> None:
    """config.json (with the head recorded) + weights."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", {**model.config.to_dict(), "head": head_of(model)})
    save_weights(model, directory / weights_name)


def run_file(directory: str | Path, name: str) -> Path:
    """directory/name, which must exist: a missing one is a user error naming the directory."""
    path = Path(directory) / name
    if not path.is_file():
        raise MinilmError(f"{path} not found: is {directory} a minilm run directory (made by train.py/finetune.py)?")
    return path


def load_model_config(directory: str | Path) -> tuple[ModelConfig, str]:
    """A run directory's architecture and the head it was saved with (config.json)."""
    fields = read_json(run_file(directory, "config.json"))
    if "model_type" in fields:
        raise MinilmError(f"{directory} is a Hugging Face model directory (config.json has a model_type): read it "
                          f"with minilm.hf.from_hf, or finetune.py --init hf:{directory}")
    head = fields.pop("head", "clm")
    try:
        return ModelConfig.from_dict(fields), head
    except (TypeError, ValueError) as err:
        raise MinilmError(f"{directory}/config.json: {err}") from err


def load_model_dir(directory: str | Path, weights_name: str = "model.safetensors",
                   head: str | None = None) -> PreTrained:
    """Rebuild a model from a run directory (config.json + safetensors weights)."""
    config, saved_head = load_model_config(directory)
    if head is not None and head != saved_head:
        raise MinilmError(f"{directory} holds a {HEADS[saved_head].__name__} (config.json), not a "
                          f"{HEADS[head].__name__}: pass a run directory of that kind")
    weights = run_file(directory, weights_name)
    model = HEADS[head or saved_head](config)
    load_weights(model, weights)
    return model


def new_run_dir(out: Path, hint: str = "pass --out a new directory") -> None:
    """Create `out` for a new run (or export); never write into an existing, non-empty one."""
    if out.exists() and not out.is_dir():
        raise MinilmError(f"{out} is a file, not a directory: name a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise MinilmError(f"{out} already exists and is not empty; {hint}")
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def new_run_setup(out: Path, hint: str = "pass --out a new directory") -> Iterator[None]:
    """new_run_dir(out) around a new run's setup (data, tokenizer, model: everything before its
    first step). If the setup fails, say on a user error in the data or flags that only shows
    once the tokenizer is trained, what it wrote is removed, so that the same --out works again
    once the error is fixed (a half-made run directory would be refused as not empty)."""
    existed = out.is_dir()
    new_run_dir(out, hint)
    try:
        yield
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if existed:                 # the user's own empty directory stays
            out.mkdir()
        raise


# --------------------------------------------------------------------------------------
# resume state: written as a directory, swapped in whole
# --------------------------------------------------------------------------------------
def save_state(run_dir: Path, model: PreTrained, trainer_state: dict) -> None:
    """Weights + optimizer/scaler/RNG/step, consistent with each other.

    Written to state.tmp/, then swapped for state/: a crash at any moment leaves either
    the old complete state or the new complete state (state.old/ during the swap).
    """
    tmp, final, old = run_dir / "state.tmp", run_dir / "state", run_dir / "state.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)     # left by a crash after the last swap, which completed state/
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(run_dir: Path, model: PreTrained) -> dict:
    """Restore weights into `model` and return the trainer state dict (weights_only load)."""
    state = run_dir / "state"
    if not (state / "trainer.pt").is_file() and (run_dir / "state.old" / "trainer.pt").is_file():
        state = run_dir / "state.old"          # crashed mid-swap: the previous state is whole
    if not (state / "trainer.pt").is_file():
        raise MinilmError(f"no resume state in {run_dir}/state: start a new run instead of --resume")
    if not (state / "model.safetensors").is_file():
        raise MinilmError(f"{state / 'model.safetensors'} is missing: the run cannot be resumed")
    load_weights(model, state / "model.safetensors")
    try:
        return torch.load(state / "trainer.pt", weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise MinilmError(f"{state / 'trainer.pt'} is damaged ({first_line(err)}): "
                          "the run cannot be resumed") from err
