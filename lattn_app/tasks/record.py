"""What a lattn checkpoint records beyond Lightning's own, and the check that a checkpoint fits a task.

Every checkpoint of a :class:`~lattn_app.tasks.base.LattnTask` holds ``checkpoint["lattn"]``:

- ``task``: the lattn task it was trained as (e.g. ``"StereoTask"``);
- ``config``: the full resolved ``lattn fit`` config as YAML text (None when trained outside the CLI),
  and ``config_files``: the ``--config`` files it was read from;
- ``rng_states``: the global random generators (torch, CUDA, numpy, Python) at the moment of saving,
  which a resumed run restores when training starts again;
- ``skipped_steps``: optimiser steps skipped for a non-finite loss so far; ``lattn_version``.

Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Hyperparameters that are set for evaluation or are training settings: they may differ from the
# checkpoint's without changing what the weights mean.
NOT_ARCHITECTURE = {"_class_path", "_instantiator", "lr", "weight_decay", "warmup_epochs", "min_lr_ratio",
                    "layer_decay", "freeze_backbone", "on_nonfinite_loss", "optimizer", "momentum", "lr_milestones", "compile",
                    "compile_options",
                    "num_logged_images", "teacher_checkpoint",
                    "teacher_backbone", "class_names"}
# Hyperparameters that a task left unset (None) takes from the checkpoint it loads (StereoTask.max_disparity).
TAKEN_FROM_CHECKPOINT = {"max_disparity"}


def read_checkpoint_header(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint's records, memory-mapped (its weights are not read), or a one-line error naming the file.

    An empty file, a truncated one (a full disk, an interrupted copy) and a file that is not a checkpoint
    each get their own message instead of torch's "PytorchStreamReader failed ..." or mmap errors.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the checkpoint file is empty (0 bytes); it was never written completely")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a complete checkpoint ({size:,} bytes that are not a whole torch archive: "
                         "truncated, e.g. by a full disk or an interrupted copy, or not a checkpoint at all)")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot be read as a checkpoint ({reason})") from None


def task_name(task_class: type) -> str:
    """The lattn task a class is, e.g. "StereoTask" for StereoTask and for any subclass of it."""
    for cls in task_class.__mro__:
        if cls.__module__.startswith("lattn_app.tasks") and cls.__name__ != "LattnTask":
            return cls.__name__
    return task_class.__name__


def trained_task_name(checkpoint: Mapping[str, Any]) -> str | None:
    """The task a checkpoint was trained as, from its lattn record or LightningCLI's ``_class_path``."""
    recorded = (checkpoint.get("lattn") or {}).get("task")
    if recorded:
        return recorded
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    return class_path.rsplit(".", 1)[-1] if class_path else None


def architecture(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone, attention mechanism and the backbone's own attention of a task's hyperparameters."""
    if hparams.get("network") == "psmnet":
        # StereoTask's PSMNet: its own feature extractor and (EA-PSMNet) attention module; backbone and
        # attention are not read. Mechanisms with the same weight shapes (efficient, softmax) differ here only.
        return {"backbone": "psmnet", "attention": hparams.get("psmnet_attention") or "none",
                "backbone_options.attention": None}
    options = hparams.get("backbone_options") or {}
    return {"backbone": hparams.get("backbone"), "attention": hparams.get("attention"),
            "backbone_options.attention": options.get("attention")}


def describe(task: str | None, hparams: Mapping[str, Any]) -> str:
    """E.g. "StereoTask with backbone pyramid_tiny/efficient"."""
    parts = architecture(hparams)
    attention = parts["attention"] or parts["backbone_options.attention"] or "its default attention"
    return f"{task or 'an unknown task'} with backbone {parts['backbone']}/{attention}"


def differing_hparams(trained: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: checkpoint value -> config value` for each architecture hyperparameter that differs.

    Groups of options (``backbone_options``, StereoTask's ``net``) are compared option by option
    (``net.feature_dim: 16 -> 24``).
    """
    def comparable(hparams: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, value in hparams.items():
            if key in NOT_ARCHITECTURE:
                continue
            if isinstance(value, Mapping):
                # the pretrained source is not the architecture
                values.update({f"{key}.{k}": v for k, v in value.items() if (key, k) != ("backbone_options", "pretrained")})
            else:
                values[key] = value
        return values

    trained, current = comparable(trained), comparable(current)
    return [f"{key}: {trained.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(trained) | set(current))
            if _plain(trained.get(key)) != _plain(current.get(key))
            and not (key in TAKEN_FROM_CHECKPOINT and current.get(key) is None)]


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (YAML gives lists, Python code often tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def state_dict_differences(trained: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and differently shaped weights of a checkpoint's state dict against a model's."""
    missing = [key for key in current if key not in trained]
    unexpected = [key for key in trained if key not in current]
    shapes = [f"{key} {tuple(trained[key].shape)} -> {tuple(current[key].shape)}" for key in current
              if key in trained and tuple(trained[key].shape) != tuple(current[key].shape)]
    lines = []
    for label, items in (("missing in the checkpoint", missing), ("not in this model", unexpected),
                         ("of another shape", shapes)):
        if items:
            lines.append(f"{len(items)} weights {label} (e.g. {', '.join(items[:2])})")
    return lines


def checkpoint_mismatch(checkpoint: Mapping[str, Any], task_class: type, hparams: Mapping[str, Any],
                        state_dict: Mapping[str, torch.Tensor] | None = None, loader: str = "this config",
                        advice: str | None = None) -> str | None:
    """Why `checkpoint` cannot be loaded into a task of `task_class` with `hparams`, or None when it fits.

    It does not fit when it was trained as another task, with another backbone or attention mechanism,
    or (given the model's `state_dict`) when its weights differ in names or shapes because of other
    hyperparameters. The answer names what differs and, unless `advice` replaces it, the config the
    checkpoint was trained with; `loader` names what builds the model ("this config").
    """
    trained_hparams = checkpoint.get("hyper_parameters") or {}
    trained_task, task = trained_task_name(checkpoint), task_name(task_class)
    differences = []
    if trained_task and trained_task != task:
        differences.append(f"task: {trained_task!r} -> {task!r}")
    trained_parts, parts = architecture(trained_hparams), architecture(hparams)
    differences += [f"{key}: {trained_parts[key]!r} -> {parts[key]!r}" for key in parts
                    if trained_parts[key] is not None and parts[key] is not None and trained_parts[key] != parts[key]]
    weights = []
    if not differences and state_dict is not None and "state_dict" in checkpoint:
        weights = state_dict_differences(checkpoint["state_dict"], state_dict)
        if weights:
            differences = differing_hparams(trained_hparams, hparams) or ["no hyperparameter (another lattn version?)"]
    if not differences:
        return None
    if advice is None:
        record = checkpoint.get("lattn") or {}
        files = record.get("config_files") or []
        advice = "Use the config it was trained with" + (f": --config {' '.join(files)}" if files else "") + (
            " (the full config is stored in the checkpoint under ['lattn']['config'])" if record.get("config") else "")
    return (f"this checkpoint was trained as {describe(trained_task, trained_hparams)}; {loader} builds "
            f"{describe(task, hparams)}. Differences (checkpoint -> {loader}): {'; '.join(differences)}"
            + (f". Weights: {'; '.join(weights)}" if weights else "") + f". {advice}")


def collect_rng_states() -> dict[str, Any]:
    """The global random generators' states (torch, this process's GPU, numpy, Python) as plain values."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global random generators to what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
