"""The layer interface every dtrain layer implements, and the Sequential container.

A layer owns three dicts of arrays: ``params`` (trainable), ``grads`` (same keys and
shapes as ``params``) and ``buffers`` (non-trainable state such as BatchNorm's running
statistics). ``forward`` caches what ``backward`` needs; ``backward(grad_out)`` returns
the gradient with respect to the input and *writes* (does not accumulate) the parameter
gradients into ``grads`` in place. The caller hands ``grad_out`` over to ``backward``:
a layer may overwrite it (ReLU masks it in place) or return it, so a caller that still
needs it afterwards passes a copy. Arrays in these dicts are never rebound by layer code
after construction, so they may be views into one flat buffer (see
:mod:`dtrain.nn.flat`) and stay valid.

Names follow PyTorch: a Sequential's children are called ``"0"``, ``"1"``, ... and
``state_dict`` keys are ``"0.weight"``, ``"3.running_mean"`` and so on, the keys of the
equivalent ``torch.nn.Sequential``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, Array, get_array_module, to_device, to_host

Shape = tuple[int, ...]


class StateDictMismatchError(ValueError):
    """A state dict's keys or shapes do not match the model it is loaded into."""


class Module:
    """Base class of all layers and containers."""

    # True when ``forward`` always returns new memory (or a view of it) that the layer keeps
    # no reference to: the next layer may then write over it (see ``forward_owned``).
    fresh_output: bool = False
    # True when the layer has ``forward_relu``: its forward with ReLU applied as the output is
    # written; Sequential uses it for a ReLU (``is_relu``) that follows the layer.
    fuses_relu_after: bool = False
    # True when the layer has ``backward_through_relu``: its backward followed by that of a
    # ReLU right before it, applied as the input gradient is written (the ReLU then keeps
    # nothing for backward; the layer's ``forward_after_relu`` notes what it needs).
    fuses_relu_before: bool = False
    is_relu: bool = False
    # True when the layer has ``tiled_columns``: a ReLU's output that is its input may be
    # written straight into its column matrix by the layer before the ReLU, if that layer
    # ``writes_tiled_output`` (with ``forward_relu_into``); see Sequential.forward.
    takes_tiled_input: bool = False
    writes_tiled_output: bool = False

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self.training: bool = True

    # -- computation -----------------------------------------------------------------
    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def forward_owned(self, x: Array) -> Array:
        """``forward`` on an input that nobody else holds (a ``fresh_output`` of the layer
        before, as :class:`Sequential` passes it): the layer may write its output over ``x``.
        The default is ``forward``."""
        return self.forward(x)

    def forward_relu(self, x: Array) -> Array:
        """``forward`` followed by ReLU, in the pass that writes the output (``fuses_relu_after``)."""
        raise TypeError(f"{type(self).__name__} cannot apply ReLU in its forward (fuses_relu_after is False)")

    def forward_relu_into(self, x: Array, into: Any) -> Any:
        """``forward_relu`` writing its output into ``into``, the input columns of a layer
        that ``takes_tiled_input`` (``writes_tiled_output``); None when it cannot."""
        raise TypeError(f"{type(self).__name__} cannot write its output into columns (writes_tiled_output is False)")

    def tiled_columns(self, input_shape: Shape, n: int, like: Array) -> Any:
        """Where the layer before may write this layer's input (``takes_tiled_input``), or None."""
        raise TypeError(f"{type(self).__name__} takes no columns as input (takes_tiled_input is False)")

    def forward_after_relu(self, x: Array) -> Array:
        """``forward`` of a ReLU's output, for a layer that ``fuses_relu_before``: it keeps
        what ``backward_through_relu`` needs. The default is ``forward`` (Conv2d keeps its
        input, which is all it needs; so its ``forward_relu`` serves after a ReLU too)."""
        return self.forward(x)

    def backward_through_relu(self, grad_out: Array) -> Array:
        """``backward``, then the backward of the ReLU whose output was this layer's input,
        in the pass that writes the input gradient (``fuses_relu_before``)."""
        raise TypeError(f"{type(self).__name__} cannot apply ReLU's backward (fuses_relu_before is False)")

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array | None:
        """d loss / d input from d loss / d output (``grad_out``), writing the parameters'
        gradients into ``grads``. With ``input_grad=False`` the caller has no use for the
        input gradient: a layer may skip computing it (Conv2d and Linear do) and return None."""
        raise NotImplementedError

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        """Per-sample output shape for a per-sample input shape (batch axis excluded).

        Raises ``ValueError`` naming the layer when the input cannot be processed.
        The default is shape-preserving (activations, dropout, normalization).
        """
        return tuple(input_shape)

    def flops(self, input_shape: Shape) -> int:
        """Multiply-adds x 2 of one sample's forward pass (0 for cheap elementwise layers)."""
        return 0

    # -- structure -------------------------------------------------------------------
    def children(self) -> dict[str, Module]:
        return {}

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.children().items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> Iterator[tuple[str, Module, str]]:
        """(full name, owning layer, key) for every parameter, in registration order."""
        for mod_name, mod in self.named_modules():
            for key in mod.params:
                yield (f"{mod_name}.{key}" if mod_name else key), mod, key

    def named_buffers(self) -> Iterator[tuple[str, Module, str]]:
        for mod_name, mod in self.named_modules():
            for key in mod.buffers:
                yield (f"{mod_name}.{key}" if mod_name else key), mod, key

    def num_parameters(self) -> int:
        return int(sum(mod.params[k].size for _, mod, k in self.named_parameters()))

    # -- mode ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for _, mod in self.named_modules():
            mod.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def set_batch_context(self, step: int, sample_ids: Array | None) -> None:
        """Tell stochastic layers which step and which global samples the next batch is.

        Dropout draws its mask from (seed, step, sample id, feature), so masks do not
        depend on how a global batch is split across ranks. Layers without randomness
        ignore this.
        """
        for child in self.children().values():
            child.set_batch_context(step, sample_ids)

    # -- parameters ------------------------------------------------------------------
    def register_param(self, name: str, value: Array) -> None:
        self.params[name] = value
        xp = get_array_module(value)
        self.grads[name] = xp.zeros_like(value)

    def to(self, xp: ModuleType, dtype: Any = None) -> Module:
        """Move every parameter, gradient and buffer to ``xp`` (and cast to ``dtype``)."""
        for _, mod in self.named_modules():
            for d in (mod.params, mod.grads, mod.buffers):
                for k in d:
                    d[k] = to_device(d[k], xp, dtype if d[k].dtype.kind == "f" else None)
        return self

    @property
    def dtype(self) -> Any:
        for _, mod, key in self.named_parameters():
            return mod.params[key].dtype
        return np.dtype(DEFAULT_DTYPE)

    def state_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        """Host copies of parameters and buffers, keyed like PyTorch's ``state_dict``.

        ``copy=False``: on the CPU the model's own arrays (no extra memory; for reading them
        at once, as a checkpoint write does), on the GPU host copies all the same.
        """
        out: dict[str, np.ndarray] = {}
        for name, mod, key in self.named_parameters():
            out[name] = to_host(mod.params[key], copy)
        for name, mod, key in self.named_buffers():
            out[name] = to_host(mod.buffers[key], copy)
        return out

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, source: str = "state_dict") -> None:
        """Copy arrays into the existing parameters and buffers (in place, keeping views,
        cast to their dtype).

        Checked before anything is copied: every shape mismatch and, with ``strict``, every
        missing and unexpected key, all in one :class:`StateDictMismatchError` that names
        ``source`` (where ``state`` came from, e.g. a file).
        """
        targets = {n: (m.params, k) for n, m, k in self.named_parameters()}
        targets.update({n: (m.buffers, k) for n, m, k in self.named_buffers()})
        problems = []
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        if strict and missing:
            problems.append(f"missing: {missing}")
        if strict and unexpected:
            problems.append(f"not in the model: {unexpected}")
        mismatched = [f"{name!r}: {tuple(np.shape(state[name]))} given, model {tuple(store[key].shape)}"
                      for name, (store, key) in targets.items()
                      if name in state and tuple(np.shape(state[name])) != tuple(store[key].shape)]
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        if problems:
            raise StateDictMismatchError(
                f"{source} does not fit the model ({'; '.join(problems)}). "
                f"Build the model from the same model config that produced {source}."
            )
        for name, (store, key) in targets.items():
            if name in state:
                dst = store[key]
                dst[...] = get_array_module(dst).asarray(to_host(state[name]), dtype=dst.dtype)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = self.children()
        if not kids:
            return f"{type(self).__name__}({self.extra_repr()})"
        body = "\n".join(f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in kids.items())
        return f"{type(self).__name__}(\n{body}\n)"


BackwardHook = Callable[[int, Module], None]


class Sequential(Module):
    """Layers applied in order; children are named ``"0"``, ``"1"``, ... like PyTorch.

    ``backward`` runs the layers in reverse and, after each one, calls every registered
    hook with ``(index, layer)``: the data-parallel code uses this to start reducing a
    gradient bucket as soon as the layers that fill it are done.
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential item {i} is {type(layer).__name__}, not a dtrain Module")
        self.layers: list[Module] = list(layers)
        self._backward_hooks: list[BackwardHook] = []

    def children(self) -> dict[str, Module]:
        return {str(i): layer for i, layer in enumerate(self.layers)}

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def register_backward_hook(self, hook: BackwardHook) -> None:
        self._backward_hooks.append(hook)

    def forward(self, x: Array) -> Array:
        """The layers in order, with ReLUs fused into the layers around them.

        A ReLU right after a layer that ``fuses_relu_after`` (Conv2d, Linear) is applied by
        that layer as it writes its output (``forward_relu``); the ReLU only keeps the result
        for backward (``adopt``). When the layer after that ReLU ``takes_tiled_input`` and
        offers its columns for it (``tiled_columns``: a convolution whose windows tile its
        input, on the CPU), a layer that ``writes_tiled_output`` writes the ReLU's output
        straight into them (``forward_relu_into``) and the convolution gets those columns
        as its input: the activation is never written in its own layout. A ReLU right before a layer that ``fuses_relu_before``
        (Conv2d, MaxPool2d) keeps nothing (``release``): that layer runs its backward
        (``backward_through_relu``) and is called with ``forward_after_relu``. Otherwise a
        layer whose input is the previous layer's fresh output (``fresh_output``) gets it
        through ``forward_owned``, so that an activation can work in place. The caller's
        ``x`` is never written.
        """
        owned, i = False, 0
        while i < len(self.layers):
            layer = self.layers[i]
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if layer.fuses_relu_after and following is not None and following.is_relu:
                into = self._tiled_target(i, x)
                y = layer.forward_relu_into(x, into) if into is not None else None
                x = following.adopt(layer.forward_relu(x) if y is None else y)
                relu, owned, i = following, following.fresh_output, i + 2
            else:
                if i > 0 and self.layers[i - 1].is_relu and layer.fuses_relu_before:
                    x = layer.forward_after_relu(x)
                else:
                    x = layer.forward_owned(x) if owned else layer.forward(x)
                relu, owned, i = (layer if layer.is_relu else None), layer.fresh_output, i + 1
            if relu is not None and i < len(self.layers) and self.layers[i].fuses_relu_before:
                relu.release()  # the next layer runs this ReLU's backward
        return x

    def _tiled_target(self, i: int, x: Any) -> Any:
        """The columns of layer ``i + 2`` for layer ``i``'s output (through the ReLU between),
        when layer ``i`` writes tiled output and layer ``i + 2`` takes it; else None."""
        consumer = self.layers[i + 2] if i + 2 < len(self.layers) else None
        if consumer is None or not (consumer.takes_tiled_input and self.layers[i].writes_tiled_output):
            return None
        # x is the input array (N, ...), or columns that layer i itself got (shape (C, H, W, N)).
        like, per_sample, n = (x, x.shape[1:], x.shape[0]) if hasattr(x, "ndim") else (x.cols, x.shape[:3], x.shape[3])
        return consumer.tiled_columns(self.layers[i].output_shape(per_sample), n, like)

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array | None:
        """Backward through the layers in reverse; the hooks run after each layer.

        ``input_grad=False`` (training: nobody needs d loss / d input) stops at the first
        layer with parameters, which is told not to compute its input gradient; the layers
        before it have nothing to contribute and are skipped. Returns None then. A ReLU
        right before a layer that ``fuses_relu_before`` (Conv2d, MaxPool2d) is run by that
        layer as it writes its input gradient (``backward_through_relu``); the hooks still
        see both.
        """
        first = 0 if input_grad else next((i for i, layer in enumerate(self.layers) if layer.params), len(self.layers))
        g = grad_out
        i = len(self.layers) - 1
        while i >= 0:
            layer = self.layers[i]
            wanted = i > first or input_grad
            before = self.layers[i - 1] if i > 0 else None
            if wanted and layer.fuses_relu_before and before is not None and before.is_relu:
                g = layer.backward_through_relu(g)
                self._after_backward(i, layer)
                self._after_backward(i - 1, before)
                i -= 2
                continue
            if wanted:
                g = layer.backward(g)
            elif i == first:
                g = layer.backward(g, input_grad=False)
            self._after_backward(i, layer)
            i -= 1
        return g if input_grad else None

    def _after_backward(self, index: int, layer: Module) -> None:
        for hook in self._backward_hooks:
            hook(index, layer)

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def flops(self, input_shape: Shape) -> int:
        total, shape = 0, tuple(input_shape)
        for layer in self.layers:
            total += layer.flops(shape)
            shape = layer.output_shape(shape)
        return total
