"""Mixed precision (float16 compute, float32 master weights, dynamic loss scaling) and TF32.

``precision.compute=float16`` keeps the run's float32 model and its
:class:`~dtrain.nn.flat.FlatParameters` as the *master*: the optimizer, checkpoints,
evaluation, export, the start-up broadcast and TensorBoard all keep using it. Forward and
backward run on a *compute twin*, the same model built again from the same spec and seed
and converted to float16, with its own flat buffers laid out exactly like the master's.
Each training step (:class:`MixedPrecision`):

1. :meth:`~MixedPrecision.prepare` casts the master parameters into the twin's (one
   vectorized cast over the flat buffer);
2. the batch is cast to float16 (:meth:`~MixedPrecision.cast_input`) and the twin runs
   forward and backward, the loss gradient multiplied by the loss scale so that small
   gradients do not underflow float16;
3. :meth:`~MixedPrecision.grads_to_master` writes ``twin grads / scale`` into the master
   gradient buffer in float32; the gradient all-reduce, the non-finite check and the
   optimizer step then work on the master buffer as in a float32 run;
4. :meth:`~MixedPrecision.overflowed` feeds the (all-reduced, so rank-independent)
   finiteness of that gradient to the :class:`LossScaler`, which follows
   ``torch.amp.GradScaler``'s rules: an overflow skips the step and backs the scale off,
   ``growth_interval`` finite steps in a row grow it.

The twin's BatchNorm layers share the master's running statistics (the same float32
arrays): BatchNorm computes in float32 for float16 input, so the statistics are updated
exactly as in a float32 run and evaluating the master model needs no copy.

``precision.tf32=true`` lets cuBLAS run float32 GEMMs on TF32 tensor cores (GPU only).
"""
from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dtrain.backend import get_array_module
from dtrain.checks import check_int, check_real
from dtrain.config import PrecisionConfig
from dtrain.models import build_model
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array, Sequential

log = logging.getLogger("dtrain")

class LossScaler:
    """The loss scale of float16 training: dynamic (``torch.amp.GradScaler``'s rules) or static.

    Dynamic: after each step call :meth:`update` with whether the (unscaled, all-reduced)
    gradient was finite. A non-finite gradient multiplies ``scale`` by ``backoff_factor``
    and resets ``growth_tracker``; otherwise ``growth_tracker`` counts up and on reaching
    ``growth_interval`` the scale is multiplied by ``growth_factor`` (if that stays finite
    in float32) and the tracker restarts. Like GradScaler the scale is a float32 value.
    Static (``dynamic=False``): ``scale`` never changes and :meth:`update` only counts.
    ``skipped_steps`` counts the overflows that skipped a step.
    """

    def __init__(self, init_scale: float = 65536.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, dynamic: bool = True) -> None:
        self.scale = float(np.float32(init_scale))
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.dynamic = dynamic
        self.growth_tracker = 0
        self.skipped_steps = 0

    def update(self, finite: bool) -> None:
        """Adjust the scale after a step whose gradient was ``finite`` (or not)."""
        if not self.dynamic:
            return
        if not finite:
            self.scale = float(np.float32(self.scale) * np.float32(self.backoff_factor))
            self.growth_tracker = 0
            self.skipped_steps += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(self.scale) * np.float32(self.growth_factor)
            if np.isfinite(grown):
                self.scale = float(grown)
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"scale": float, "growth_tracker": int, "skipped_steps": int}``."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; ``ValueError`` for anything else."""
        expected = {"scale", "growth_tracker", "skipped_steps"}
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"LossScaler.load_state_dict: expected keys {sorted(expected)}, got {got}")
        check_real(state["scale"], "LossScaler.load_state_dict: scale", 0.0, low_open=True)
        for key in ("growth_tracker", "skipped_steps"):
            check_int(state[key], f"LossScaler.load_state_dict: {key}", 0)
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped_steps = int(state["skipped_steps"])

    def __repr__(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"LossScaler({kind}, scale={self.scale:g}, growth_tracker={self.growth_tracker})"


class PrecisionPolicy(abc.ABC):
    """How forward and backward relate to the master weights: the training loop's hooks.

    ``model`` and ``flat`` are the compute model and its flat buffers; ``loss_scale``
    multiplies the loss gradient. Per step: :meth:`prepare` (master parameters into the
    compute model), forward on :meth:`cast_input` of the batch, backward, then
    :meth:`grads_to_master` (the compute gradients, unscaled, into the master buffer) and,
    after the gradient all-reduce, :meth:`overflowed`.
    """

    mixed: bool
    model: Sequential
    flat: FlatParameters

    @property
    @abc.abstractmethod
    def loss_scale(self) -> float:
        """The factor the loss gradient is multiplied by."""

    @abc.abstractmethod
    def prepare(self) -> None:
        """Bring the compute model's parameters up to date with the master."""

    @abc.abstractmethod
    def cast_input(self, x: Array) -> Array:
        """``x`` in the compute dtype."""

    @abc.abstractmethod
    def unscale_into(self, grads: Array, out: Array) -> None:
        """``out`` (master dtype) = the unscaled gradient ``grads`` of a compute model."""

    @abc.abstractmethod
    def grads_to_master(self) -> None:
        """Put the compute model's unscaled gradients into the master buffer."""

    @abc.abstractmethod
    def overflowed(self, finite: bool) -> bool:
        """Record this step's gradient finiteness; True when a non-finite gradient is a
        routine loss-scaling overflow (skip the step, no error)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's ``extra`` section holds for this policy."""

    @abc.abstractmethod
    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's ``extra`` section."""

    @abc.abstractmethod
    def summary(self) -> dict[str, Any]:
        """The policy's figures for ``summary.json``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One phrase for the log."""


class FullPrecision(PrecisionPolicy):
    """Forward and backward on the master model itself (``precision.compute=float32``):
    every hook is a no-op, no copies, loss scale 1."""

    mixed = False

    def __init__(self, master: Sequential, master_flat: FlatParameters) -> None:
        self.model = master
        self.flat = master_flat

    @property
    def loss_scale(self) -> float:
        return 1.0

    def prepare(self) -> None:
        """Nothing to do: the compute model is the master."""

    def cast_input(self, x: Array) -> Array:
        return x

    def unscale_into(self, grads: Array, out: Array) -> None:
        if out is not grads:
            out[...] = grads

    def grads_to_master(self) -> None:
        """Nothing to do: the gradients are the master's already."""

    def overflowed(self, finite: bool) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        """Nothing to restore."""

    def summary(self) -> dict[str, Any]:
        return {"compute": self.model.dtype.name, "master": self.model.dtype.name, "loss_scale": None,
                "final_loss_scale": None, "skipped_steps": 0}

    def describe(self) -> str:
        return self.model.dtype.name


class MixedPrecision(PrecisionPolicy):
    """float16 forward/backward on ``twin``, float32 master weights in ``master_flat``.

    ``twin`` must be ``master``'s architecture converted to float16 and ``twin_flat`` its
    FlatParameters with the same entries at the same offsets (``ValueError`` otherwise).
    The twin's buffers (BatchNorm running statistics) are rebound to the master's arrays,
    and its BatchNorm layers use the master's ``stats_reducer`` (synchronized BatchNorm).
    """

    mixed = True

    def __init__(self, master: Sequential, master_flat: FlatParameters, twin: Sequential,
                 twin_flat: FlatParameters, scaler: LossScaler) -> None:
        if master_flat.dtype != np.float32 or twin_flat.dtype != np.float16:
            raise ValueError(
                f"MixedPrecision needs float32 master and float16 compute parameters; got "
                f"{master_flat.dtype} and {twin_flat.dtype}"
            )
        if _layout(master_flat) != _layout(twin_flat) or master_flat.size != twin_flat.size:
            raise ValueError(
                "MixedPrecision: the compute twin's flat parameter layout differs from the master's "
                "(build both models from the same spec and flatten them with the same align)"
            )
        _share_buffers(master, twin)
        self.model = twin
        self.flat = twin_flat
        self.master = master
        self.master_flat = master_flat
        self.twin_flat = twin_flat
        self.scaler = scaler

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    def prepare(self) -> None:
        """Cast the master parameters into the twin's buffer (float32 -> float16, one pass)."""
        self.twin_flat.params[...] = self.master_flat.params

    def cast_input(self, x: Array) -> Array:
        """``x`` as float16; the loader normalizes in float32 first, which keeps its rounding at one cast."""
        return x.astype(np.float16)

    def grads_to_master(self) -> None:
        """``master grads = float32(twin grads) * (1 / scale)``; an Inf/NaN stays non-finite."""
        self.unscale_into(self.twin_flat.grads, self.master_flat.grads)

    def unscale_into(self, grads: Array, out: Array) -> None:
        """``out = float32(grads) * (1 / scale)`` for float16 ``grads`` of a compute model."""
        xp = get_array_module(grads)
        # dtype=float32: multiply in float32; in float16 small unscaled gradients would underflow.
        xp.multiply(grads, np.float32(1.0 / self.scaler.scale), out=out, dtype=np.float32)

    def overflowed(self, finite: bool) -> bool:
        """Record this step's gradient finiteness; True when a non-finite gradient is a float16
        overflow that dynamic loss scaling absorbs (skip the step, no error). With a static
        scale a non-finite gradient is an error like in float32 (``trainer.on_nonfinite``)."""
        self.scaler.update(finite)
        return self.scaler.dynamic and not finite

    def state_dict(self) -> dict[str, Any]:
        return {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, extra: Mapping[str, Any]) -> None:
        state = extra.get("loss_scaler")
        if state is None:
            log.info("the checkpoint holds no loss-scaler state (a float32 run); starting at scale %g",
                     self.scaler.scale)
            return
        self.scaler.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        return {"compute": "float16", "master": "float32",
                "loss_scale": "dynamic" if self.scaler.dynamic else self.scaler.scale,
                "final_loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped_steps}

    def describe(self) -> str:
        kind = "dynamic" if self.scaler.dynamic else "static"
        return f"float16 compute, float32 master weights, {kind} loss scale {self.scaler.scale:g}"


def _layout(flat: FlatParameters) -> list[tuple[str, int, int, tuple[int, ...]]]:
    return [(e.name, e.offset, e.size, e.shape) for e in flat.entries]


def _share_buffers(master: Sequential, twin: Sequential) -> None:
    """Rebind every buffer of ``twin`` to ``master``'s array of the same name, and give the
    twin's layers the master's BatchNorm ``stats_reducer``."""
    master_modules = dict(master.named_modules())
    for name, mod in twin.named_modules():
        ref = master_modules.get(name)
        if type(ref) is not type(mod) or set(ref.buffers) != set(mod.buffers):
            raise ValueError(f"MixedPrecision: the compute twin's layer {name!r} does not match the master's")
        for key in mod.buffers:
            mod.buffers[key] = ref.buffers[key]
        if hasattr(ref, "stats_reducer"):
            mod.stats_reducer = ref.stats_reducer


def make_precision(settings: PrecisionConfig, master: Sequential, master_flat: FlatParameters,
                   spec: Mapping[str, Any], seed: int) -> PrecisionPolicy:
    """The precision hooks of a training run: :class:`FullPrecision` for float32 compute,
    else :class:`MixedPrecision` around a compute twin built from the master's model
    ``spec`` and ``seed`` and converted to float16 on the master's array module."""
    if not settings.mixed:
        return FullPrecision(master, master_flat)
    xp = get_array_module(master_flat.params)
    twin = build_model(spec, seed=seed, dtype=np.float32).to(xp, np.float16)
    twin.train(master.training)
    scale = settings.init_scale if settings.dynamic else settings.loss_scale
    scaler = LossScaler(scale, settings.growth_factor, settings.backoff_factor, settings.growth_interval,
                        dynamic=settings.dynamic)
    return MixedPrecision(master, master_flat, twin, FlatParameters(twin, align=master_flat.align), scaler)


def enable_tf32() -> None:
    """Let CuPy run float32 matrix products on TF32 tensor cores (compute capability >= 8.0).

    CuPy decides a dtype's GEMM compute type on its first matrix product of that dtype
    (``get_compute_type`` reads ``CUPY_TF32`` then and caches the answer), not at import;
    ``set_compute_type`` changes the cached value at run time. Both are done: the
    variable covers a CuPy without that internal function, the call covers a process
    that already ran a float32 product. Older GPUs keep full float32 (CuPy warns).
    """
    os.environ["CUPY_TF32"] = "1"
    try:
        from cupy._core import _routines_linalg as linalg
    except ImportError:
        return
    set_compute_type = getattr(linalg, "set_compute_type", None)
    tf32 = getattr(linalg, "COMPUTE_TYPE_TF32", None)
    if set_compute_type is not None and tf32 is not None:
        set_compute_type(np.float32, tf32)
