"""Training checkpoints: one ``.npz`` file per save, written atomically.

File layout (plain ``numpy.load(path)`` reads it, no pickle involved):

- ``model/<name>``: every parameter and buffer under its state_dict name
  (``model/0.weight``, ``model/3.running_mean``), in the model's dtype.
- ``optim/<path>``, ``rng/<path>``, ``extra/<path>``: the arrays found anywhere inside
  the optimizer state dict, the RNG state and ``extra``; ``<path>`` joins the dict keys
  and list indices leading to the array with ``/`` (``optim/momentum``).
- ``meta/optim``, ``meta/rng``, ``meta/extra``: JSON text of the same three objects with
  each array replaced by ``{"__array__": "<npz key>"}`` (tuples by ``{"__tuple__": [...]}``),
  so loading rebuilds them exactly; ``meta/optim`` is ``null`` when no optimizer was saved.
- ``meta/epoch``, ``meta/step`` (int64 scalars), ``meta/config`` (YAML text),
  ``meta/config_type`` (``"str"`` or ``"dict"``: what was passed in),
  ``meta/dtrain_version`` and ``meta/format`` (``"dtrain-checkpoint-v1"``).

:class:`CheckpointManager` names files ``ckpt-{step:08d}.npz`` in one directory and keeps
the newest ``keep_last``; :func:`run_checkpoints` lists the runs' checkpoints that
``trainer.resume=auto`` chooses from (:mod:`dtrain.rundir`).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml

from dtrain.atomic import atomic_write, remove_stale_temp_files
from dtrain.backend import is_gpu_array, to_host
from dtrain.checks import check_int
from dtrain.nn.module import Module

FORMAT = "dtrain-checkpoint-v1"
CHECKPOINT_GLOB = "ckpt-*.npz"
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.npz")
_ARRAY, _TUPLE = "__array__", "__tuple__"

PathLike = str | os.PathLike


class CheckpointError(Exception):
    """A checkpoint file cannot be read: corrupt, truncated, or not a dtrain checkpoint."""


@dataclass
class Checkpoint:
    """Everything one checkpoint file holds, on the host.

    ``model_state`` maps state_dict names to NumPy arrays; ``optim_state`` is what the
    optimizer's ``state_dict()`` returned (``None`` if no optimizer was saved);
    ``config`` is the YAML string or the dict that was passed to the save.
    """

    path: Path
    model_state: dict[str, np.ndarray]
    optim_state: dict[str, Any] | None
    epoch: int
    step: int
    rng_state: dict[str, Any]
    config: dict[str, Any] | str
    extra: dict[str, Any] = field(default_factory=dict)
    dtrain_version: str = "unknown"

    def restore(self, model: Module, optimizer: Any = None) -> None:
        """Copy the weights into ``model`` and, if given, the state into ``optimizer``.

        The model is checked first: a ``StateDictMismatchError`` lists every missing key,
        unexpected key and shape mismatch and names this file; nothing is copied then.
        """
        model.load_state_dict(self.model_state, source=f"checkpoint {self.path}")
        if optimizer is not None:
            if self.optim_state is None:
                raise CheckpointError(
                    f"{self.path}: the checkpoint holds no optimizer state (it was saved without "
                    f"an optimizer); restore the model only, or start from a full training checkpoint"
                )
            optimizer.load_state_dict(self.optim_state)


def dtrain_version() -> str:
    try:
        return importlib.metadata.version("dtrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- saving ------------------------------------------------------------------------------
def save_checkpoint(
    path: PathLike,
    model: Module,
    optimizer: Any,
    *,
    epoch: int,
    step: int,
    rng_state: dict[str, Any],
    config: dict[str, Any] | str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint file at ``path`` atomically and return its path.

    ``optimizer`` needs ``state_dict(copy=False)`` (or is ``None``); ``rng_state`` and ``extra``
    are dicts of JSON-able values (str keys; ints, floats, str, bool, None, lists,
    tuples, dicts) and arrays; ``config`` is YAML text or a plain dict (pass an OmegaConf
    config through ``OmegaConf.to_container(cfg, resolve=True)``). Until this function
    returns, ``path`` is either absent or the previous complete file.
    """
    arrays = _collect_arrays(model, optimizer, epoch, step, rng_state, config, extra)
    return atomic_write(path, lambda f: _write_npz(f, arrays))


def _collect_arrays(
    model: Module,
    optimizer: Any,
    epoch: int,
    step: int,
    rng_state: dict[str, Any],
    config: dict[str, Any] | str,
    extra: dict[str, Any] | None,
) -> dict[str, np.ndarray]:
    check_int(epoch, "save_checkpoint: epoch", 0)
    check_int(step, "save_checkpoint: step", 0)
    if not isinstance(rng_state, dict):
        raise TypeError(f"save_checkpoint: rng_state must be a dict, got {type(rng_state).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_checkpoint: extra must be a dict or None, got {type(extra).__name__}")

    # The arrays themselves, not copies (on the CPU): they are written out before this returns.
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in model.state_dict(copy=False).items()}
    optim_state = optimizer.state_dict(copy=False) if optimizer is not None else None
    for section, obj in (("optim", optim_state), ("rng", rng_state), ("extra", extra or {})):
        skeleton = _pack(obj, section, arrays)
        arrays[f"meta/{section}"] = np.array(json.dumps(skeleton))
    config_type, config_text = _config_text(config)
    arrays.update({
        "meta/format": np.array(FORMAT),
        "meta/dtrain_version": np.array(dtrain_version()),
        "meta/epoch": np.array(int(epoch), dtype=np.int64),
        "meta/step": np.array(int(step), dtype=np.int64),
        "meta/config": np.array(config_text),
        "meta/config_type": np.array(config_type),
    })
    return arrays


def _write_npz(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """The one place bytes of a checkpoint are produced (tests replace it to simulate crashes)."""
    np.savez(f, **arrays)


def _config_text(config: dict[str, Any] | str) -> tuple[str, str]:
    if isinstance(config, str):
        return "str", config
    if isinstance(config, dict):
        try:
            return "dict", yaml.safe_dump(config, sort_keys=False)
        except yaml.YAMLError as err:
            raise TypeError(
                f"save_checkpoint: config must hold plain YAML values (dicts, lists, str, numbers): {err}"
            ) from None
    raise TypeError(
        f"save_checkpoint: config must be YAML text or a dict, got {type(config).__name__}; "
        f"for an OmegaConf config pass OmegaConf.to_yaml(cfg)"
    )


def _pack(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able copy of ``obj`` with arrays moved into ``arrays`` under ``path``-derived keys."""
    if isinstance(obj, np.ndarray) or is_gpu_array(obj):
        host = np.asarray(to_host(obj), order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
        if host.dtype.hasobject:
            raise TypeError(f"save_checkpoint: {path} is an object array, which cannot be saved without pickle")
        if path in arrays:
            raise ValueError(f"save_checkpoint: two arrays would both be stored as {path!r}; rename a key")
        arrays[path] = host
        return {_ARRAY: path}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        packed = {}
        for key, value in obj.items():
            if not isinstance(key, str) or key in (_ARRAY, _TUPLE):
                raise TypeError(
                    f"save_checkpoint: key {key!r} in {path} must be a str other than {_ARRAY!r}/{_TUPLE!r}"
                )
            packed[key] = _pack(value, f"{path}/{key}", arrays)
        return packed
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    raise TypeError(
        f"save_checkpoint: {path} is a {type(obj).__name__}; only dicts, lists, tuples, "
        f"str, numbers, bools, None and arrays can be stored"
    )


# -- loading -----------------------------------------------------------------------------
def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` into host memory.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` naming
    the file when it is corrupt, truncated or not a dtrain checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    arrays = _read_npz(path)
    if str(arrays.get("meta/format", "")) != FORMAT:
        raise CheckpointError(
            f"{path} is not a dtrain checkpoint (no meta/format == {FORMAT!r}); "
            f"pass a ckpt-*.npz written by dtrain"
        )
    try:
        sections = {s: _unpack(json.loads(str(arrays[f"meta/{s}"])), arrays) for s in ("optim", "rng", "extra")}
        config_text = str(arrays["meta/config"])
        config = yaml.safe_load(config_text) if str(arrays["meta/config_type"]) == "dict" else config_text
        return Checkpoint(
            path=path,
            model_state={k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")},
            optim_state=sections["optim"],
            epoch=int(arrays["meta/epoch"]),
            step=int(arrays["meta/step"]),
            rng_state=sections["rng"],
            config=config,
            extra=sections["extra"],
            dtrain_version=str(arrays["meta/dtrain_version"]),
        )
    except (KeyError, ValueError, TypeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({type(err).__name__}: {err})") from err


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file, read eagerly so a truncated or bit-flipped file fails here."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError, zlib.error, OSError ...
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read ({type(err).__name__}: {err}); "
            f"delete it and resume from an earlier checkpoint"
        ) from err


def _unpack(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        if set(obj) == {_TUPLE}:
            return tuple(_unpack(v, arrays) for v in obj[_TUPLE])
        return {k: _unpack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, arrays) for v in obj]
    return obj


# -- a directory of checkpoints ------------------------------------------------------------
def checkpoint_step(path: PathLike) -> int | None:
    """The step encoded in a ``ckpt-<step>.npz`` file name, or None for other names."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _checkpoints_in(paths: Iterable[Path]) -> list[tuple[int, Path]]:
    found = []
    for p in paths:
        step = checkpoint_step(p)
        if step is not None and p.is_file():
            found.append((step, p))
    return found


class CheckpointManager:
    """Checkpoints ``ckpt-{step:08d}.npz`` in ``directory``, keeping the newest ``keep_last``.

    The manager assumes it is the only writer of ``directory`` (rank 0 of one run): on
    construction (unless ``clean=False``) it deletes temporary files an earlier crashed
    save left behind.
    """

    def __init__(self, directory: PathLike, keep_last: int, clean: bool = True) -> None:
        check_int(keep_last, "CheckpointManager: keep_last", 1)
        self.directory = Path(directory)
        self.keep_last = keep_last
        if clean and self.directory.is_dir():
            self.remove_stale_temp_files()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of saves that a crash interrupted (a SIGKILL during
        :func:`save_checkpoint` leaves a hidden full-size one); returns them."""
        return remove_stale_temp_files(self.directory, "ckpt-")

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:08d}.npz"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in the directory, oldest step first."""
        return [p for _, p in sorted(_checkpoints_in(self.directory.glob(CHECKPOINT_GLOB)))]

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None when there is none."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(
        self,
        step: int,
        model: Module,
        optimizer: Any,
        *,
        epoch: int,
        rng_state: dict[str, Any],
        config: dict[str, Any] | str,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``ckpt-{step:08d}.npz`` atomically, then prune; returns the new file's path.

        Pruning runs only after the new file is in place and keeps the file just written
        plus the ``keep_last - 1`` others with the highest steps.
        """
        path = save_checkpoint(
            self.path_for(step), model, optimizer,
            epoch=epoch, step=step, rng_state=rng_state, config=config, extra=extra,
        )
        self._prune(keep=path)
        return path

    def load(self, path: PathLike) -> Checkpoint:
        return load_checkpoint(path)

    def _prune(self, keep: Path) -> None:
        others = [p for p in self.checkpoints() if p != keep]
        for old in others[: max(0, len(others) - (self.keep_last - 1))]:
            old.unlink(missing_ok=True)


def run_checkpoints(
    roots: PathLike | Iterable[PathLike] = ("outputs", "multirun"),
    *,
    exclude: PathLike | None = None,
) -> list[Path]:
    """Every checkpoint of the Hydra runs under ``roots``, the most recently written first.

    ``roots`` is one directory or several; under each, exactly these files are considered
    (the layouts of ``hydra.run.dir`` and ``hydra.sweep.dir``/``subdir`` in
    ``conf/config.yaml``)::

        <root>/<date>/<time>/checkpoints/ckpt-<step>.npz          single runs (outputs/)
        <root>/<date>/<time>/<job>/checkpoints/ckpt-<step>.npz    sweep jobs (multirun/)

    Checkpoints inside ``exclude`` (e.g. the current run's directory) are skipped.
    "Most recent" is the largest modification time (``st_mtime_ns``); ties go to the
    larger step, then to the larger path. Modification time, not step, orders runs because
    step counts of different runs are unrelated (a fresh run at step 100 is newer than an
    old run that ended at step 10000); within one run both orders agree. Missing roots are
    skipped.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    candidates: set[Path] = set()
    for root in map(Path, roots):
        for layout in ("*/*", "*/*/*"):
            candidates.update(root.glob(f"{layout}/checkpoints/{CHECKPOINT_GLOB}"))
    excluded = Path(exclude).resolve() if exclude is not None else None
    ranked = []
    for step, path in _checkpoints_in(candidates):
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        try:
            ranked.append((path.stat().st_mtime_ns, step, str(path), path))
        except FileNotFoundError:  # pruned meanwhile by a run that is still going
            continue
    return [path for *_, path in sorted(ranked, reverse=True)]


def find_latest_run_checkpoint(
    roots: PathLike | Iterable[PathLike] = ("outputs", "multirun"),
    *,
    exclude: PathLike | None = None,
) -> Path | None:
    """The most recently written checkpoint of any run under ``roots`` (see :func:`run_checkpoints`)."""
    found = run_checkpoints(roots, exclude=exclude)
    return found[0] if found else None


def read_config(path: PathLike) -> dict[str, Any] | str:
    """The config stored in a checkpoint, without reading its arrays; :class:`CheckpointError`
    when the file cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            text, kind = str(npz["meta/config"]), str(npz["meta/config_type"])
        return yaml.safe_load(text) if kind == "dict" else text
    except Exception as err:  # a damaged or foreign file
        raise CheckpointError(f"{path}: cannot read its config ({type(err).__name__}: {err})") from err
