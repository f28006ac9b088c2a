"""The optimizer interface: one vectorized update of a whole :class:`FlatParameters`.

An optimizer owns state buffers shaped like the flat parameter buffer (momentum,
moment estimates, ...) and a scratch buffer, all allocated once, so ``step()`` runs a
fixed handful of in-place array operations over the buffer with no per-layer loop and
no per-step allocation. The update rules follow ``torch.optim``'s formulas in its
operation order, so a dtrain run and a PyTorch run fed the same gradients follow the same
trajectory (the tests compare them step by step in float64).

On the CPU the update runs on blocks of the buffer spread over the thread budget
(:func:`dtrain.nn.blocks.for_blocks`): SGD and Adam as one fused pass per block
(:mod:`dtrain.optim.cpu_updates`, the same arithmetic as their chains), the others as their
chain of operations, each block small enough for its slices of every buffer to stay in
cache between operations. Every element still sees the same operations, so the result does
not depend on the block size or the thread count.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dtrain.backend import get_array_module, is_gpu_array, to_host
from dtrain.checks import check_int, check_real
from dtrain.nn.blocks import for_blocks
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array
from dtrain.optim import cpu_updates

# Bytes of all buffers one block of the update touches: a few MB, inside the shared L3
# cache for each thread's block. Much smaller blocks lose to the per-call cost of the
# ten or so array operations of an update.
UPDATE_BLOCK_BYTES = 5 * 2**20


class Optimizer:
    """Base class: holds the flat buffers, ``lr``, ``weight_decay`` and the state buffers.

    Subclasses set their own hyperparameters, then call ``Optimizer.__init__``, and
    implement :meth:`_validate`, :meth:`_state_names` and :meth:`_update`.

    ``lr`` may be changed between steps (an :class:`~dtrain.optim.schedule.LRSchedule`
    sets it before every step); other hyperparameters are fixed after construction
    except through :meth:`load_state_dict`. ``step_count`` is the number of updates done.
    """

    hyperparameter_names: tuple[str, ...] = ("lr", "weight_decay")

    def __init__(self, flat: FlatParameters, lr: float, weight_decay: float = 0.0) -> None:
        if not isinstance(flat, FlatParameters):
            raise TypeError(
                f"{type(self).__name__} needs a FlatParameters (dtrain.nn.flat), got {type(flat).__name__}"
            )
        flat.check_views()
        self.flat = flat
        self.lr = lr
        self.weight_decay = weight_decay
        self._validate()
        self.step_count = 0
        self.state: dict[str, Array] = {name: self._zeros() for name in self._state_names()}
        self._tmp: Array | None = None  # the chain's scratch buffer, allocated when a chain first runs
        self._decayed: Array | None = None

    # -- subclass hooks -----------------------------------------------------------------
    def _validate(self) -> None:
        """Check (and normalize) every hyperparameter; raise ``ValueError`` naming a bad one."""
        self.weight_decay = check_real(self.weight_decay, f"{type(self).__name__}: weight_decay", 0.0)

    def _state_names(self) -> tuple[str, ...]:
        """Names of the state buffers the current hyperparameters need."""
        raise NotImplementedError

    def _update(self, p: Array, g: Array, state: dict[str, Array], tmp: Array, decayed: Array | None,
                t: int) -> None:
        """Update ``p`` in place from gradient ``g`` at step ``t`` (1 on the first step).

        ``p``, ``g`` and the ``state`` buffers are matching slices of the flat buffers;
        ``tmp`` a scratch slice as long, and ``decayed`` another one when weight decay is
        on (for :meth:`_decayed_grad`), else None.
        """
        raise NotImplementedError

    def _fused_update(self, t: int) -> Callable[..., None] | None:
        """The update at step ``t`` as one CPU pass over matching 1-D blocks, ``fn(p, g,
        *state buffers in _state_names() order)`` (see :mod:`dtrain.optim.cpu_updates`), or
        None where the optimizer has none: :meth:`_update`'s chain runs instead."""
        return None

    # -- public API -------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = check_real(value, f"{type(self).__name__}: lr", 0.0)

    def step(self) -> None:
        """Apply one update to the whole flat parameter buffer from the flat gradient buffer."""
        self.step_count += 1
        t, p, g = self.step_count, self.flat.params, self.flat.grads
        fused = None if is_gpu_array(p) or p.dtype not in cpu_updates.DTYPES else self._fused_update(t)
        if fused is not None:
            states = [self.state[name] for name in self._state_names()]

            def run(start: int, stop: int) -> None:
                fused(p[start:stop], g[start:stop], *(buf[start:stop] for buf in states))

            for_blocks(run, p.size, (2 + len(states)) * p.itemsize, p, block_bytes=UPDATE_BLOCK_BYTES)
            return
        if self._tmp is None:
            self._tmp = self._zeros()
        adds_decay = self._adds_decay_to_grad()
        if adds_decay and self._decayed is None:  # allocated once, when weight decay is first on
            self._decayed = self._zeros()
        decayed = self._decayed if adds_decay else None

        def update(start: int, stop: int) -> None:
            part = slice(start, stop)
            self._update(p[part], g[part], {name: buf[part] for name, buf in self.state.items()}, self._tmp[part],
                         None if decayed is None else decayed[part], t)

        buffers = 3 + len(self.state) + (decayed is not None)
        for_blocks(update, p.size, buffers * p.itemsize, p, block_bytes=UPDATE_BLOCK_BYTES)

    def hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.hyperparameter_names}

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """``{"optimizer": class name, "step": int, "hyperparameters": {...}, "state": {name: host array}}``.

        The state arrays are NumPy copies of the full flat-sized buffers (1-D, ``flat.size``);
        with ``copy=False`` on the CPU the buffers themselves (see :meth:`Module.state_dict`).
        """
        return {
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "hyperparameters": dict(self.hyperparameters()),
            "state": {name: to_host(buf, copy) for name, buf in self.state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step count, hyperparameters and state buffers (copied into the existing buffers).

        Like ``torch.optim``, the saved hyperparameters replace the current ones. Raises
        ``ValueError`` when the dict belongs to another optimizer, another configuration
        (different state buffers) or another model (different flat size).
        """
        name = type(self).__name__
        expected = {"optimizer", "step", "hyperparameters", "state"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}.load_state_dict: expected a dict with keys {sorted(expected)}, got {got}")
        if state["optimizer"] != name:
            raise ValueError(f"{name}.load_state_dict: the state was saved by {state['optimizer']}, not {name}")
        step = state["step"]
        check_int(step, f"{name}.load_state_dict: step", 0)
        hyper = state["hyperparameters"]
        if set(hyper) != set(self.hyperparameter_names):
            raise ValueError(
                f"{name}.load_state_dict: hyperparameters {sorted(hyper)} do not match "
                f"{sorted(self.hyperparameter_names)}"
            )
        arrays = self._checked_state_arrays(state["state"], hyper)
        self._set_hyperparameters(hyper)
        xp = get_array_module(self.flat.params)
        for key, arr in arrays.items():
            self.state[key][...] = xp.asarray(arr, dtype=self.flat.dtype)
        self.step_count = int(step)

    # -- helpers ----------------------------------------------------------------------
    def _zeros(self) -> Array:
        return get_array_module(self.flat.params).zeros_like(self.flat.params)

    def _adds_decay_to_grad(self) -> bool:
        """Whether :meth:`_update` calls :meth:`_decayed_grad` with a scratch buffer (L2 weight decay on)."""
        return self.weight_decay != 0

    def _decayed_grad(self, p: Array, g: Array, decayed: Array | None) -> Array:
        """``g + weight_decay * p`` in the scratch ``decayed`` (``g`` itself when there is no weight decay)."""
        if self.weight_decay == 0:
            return g
        xp = get_array_module(p)
        xp.multiply(p, self.weight_decay, out=decayed)
        decayed += g
        return decayed

    def _set_hyperparameters(self, hyper: dict[str, Any]) -> None:
        """Set and validate ``hyper``; on a bad value keep the current ones and re-raise."""
        old = self.hyperparameters()
        try:
            for key, value in hyper.items():
                setattr(self, key, value)
            self._validate()
            if set(self._state_names()) != set(self.state):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: hyperparameters {hyper} need state "
                    f"buffers {sorted(self._state_names())}, the saved state has {sorted(self.state)}"
                )
        except ValueError:
            for key, value in old.items():
                setattr(self, key, value)
            raise

    def _checked_state_arrays(self, arrays: Any, hyper: dict[str, Any]) -> dict[str, np.ndarray]:
        name = type(self).__name__
        if not isinstance(arrays, dict) or set(arrays) != set(self.state):
            got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
            raise ValueError(
                f"{name}.load_state_dict: the saved state buffers are {got} but this optimizer has "
                f"{sorted(self.state)}; build it with the saved hyperparameters {hyper}"
            )
        out = {}
        for key, arr in arrays.items():
            host = np.asarray(to_host(arr))
            if host.shape != (self.flat.size,):
                raise ValueError(
                    f"{name}.load_state_dict: state buffer {key!r} has shape {host.shape}, the flat "
                    f"parameter buffer has ({self.flat.size},); the state was saved for a different "
                    f"model or FlatParameters align"
                )
            out[key] = host
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
