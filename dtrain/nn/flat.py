"""One contiguous buffer for all parameters and one for all gradients.

:class:`FlatParameters` copies a model's parameters and gradients into two 1-D arrays
and rebinds every layer's ``params[key]`` and ``grads[key]`` to views of them. The
optimizers then update the whole model in one vectorized pass over ``params``, and the
data-parallel code reduces contiguous slices of ``grads`` (buckets) without gathering.
This module is the only code allowed to rebind entries of ``params``/``grads``; layers
write into the views in place (see :mod:`dtrain.nn.module`).

Flatten *after* moving or casting the model (``Module.to`` rebinds the arrays and so
detaches them from the buffer); :meth:`FlatParameters.check_views` detects that.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from dtrain.backend import get_array_module
from dtrain.checks import check_int
from dtrain.nn.module import Array, Module, Sequential, Shape


@dataclass(frozen=True)
class FlatEntry:
    """Where parameter ``name`` (``module.params[key]``) lives: ``flat[offset:offset + size]``.

    ``layer`` is the position of the top-level layer that owns it (the child index of a
    Sequential, whose backward hooks report the same index; 0 for any other model).
    """

    name: str
    module: Module
    key: str
    offset: int
    size: int
    shape: Shape
    layer: int

    @property
    def end(self) -> int:
        """One past the entry's last element in the flat buffers."""
        return self.offset + self.size


# Layer -> the FlatParameters that rebound its arrays, to refuse flattening a model twice.
_OWNERS: weakref.WeakKeyDictionary[Module, weakref.ref[FlatParameters]] = weakref.WeakKeyDictionary()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class FlatParameters:
    """Contiguous parameter and gradient buffers whose slices are the model's arrays.

    ``params`` and ``grads`` are 1-D arrays of ``size`` elements (same array module and
    dtype as the model's parameters). ``entries`` lists the parameters in
    ``model.named_parameters()`` order, which is also increasing ``offset`` order. Each
    entry starts at a multiple of ``align`` elements and ``size`` is a multiple of
    ``align``; the padding between entries is zero in both buffers and stays zero under
    every optimizer in :mod:`dtrain.optim` (zero gradient on a zero parameter gives a zero
    update). ``nbytes`` is the size in bytes of *one* buffer.

    Flattening a model whose arrays are still views of another live ``FlatParameters`` is
    a ``RuntimeError`` (reuse that object instead); once the arrays were rebound
    elsewhere (e.g. by ``Module.to``), flattening again is allowed.

    ``share_params_with``: another model's ``FlatParameters`` with the same layout (the
    same architecture and ``align``). This model's parameters then become views of *its*
    parameter buffer (their own values are dropped) while the gradients get a buffer of
    their own: a replica that computes its own gradients of the shared weights.
    """

    def __init__(self, model: Module, align: int = 1, share_params_with: FlatParameters | None = None) -> None:
        if not isinstance(model, Module):
            raise TypeError(f"FlatParameters needs a dtrain Module, got {type(model).__name__}")
        check_int(align, "FlatParameters: align", 1)
        named = list(model.named_parameters())
        owners = _top_level_owners(model)
        if not named:
            raise ValueError(f"FlatParameters: {type(model).__name__} has no parameters to flatten")
        self._check_not_flattened(named)
        xp, dtype = self._common_xp_dtype(named)

        entries: list[FlatEntry] = []
        offset = 0
        seen: dict[int, str] = {}
        for name, mod, key in named:
            value, grad = mod.params[key], mod.grads.get(key)
            if id(value) in seen:
                raise ValueError(
                    f"FlatParameters: parameter {name!r} is the same array as {seen[id(value)]!r}; "
                    f"tied parameters are not supported (give each layer its own array)"
                )
            seen[id(value)] = name
            if grad is None or tuple(grad.shape) != tuple(value.shape):
                raise ValueError(
                    f"FlatParameters: {name!r} needs a gradient of shape {tuple(value.shape)} in "
                    f"grads[{key!r}]; register parameters with Module.register_param"
                )
            offset = _round_up(offset, align)
            entries.append(FlatEntry(name, mod, key, offset, int(value.size), tuple(value.shape), owners.get(id(mod), 0)))
            offset += int(value.size)

        self.align = align
        self.size = _round_up(offset, align)
        self.entries = entries
        if share_params_with is not None:
            self._check_same_layout(share_params_with, xp, dtype)
            self.params: Array = share_params_with.params
        else:
            self.params = xp.zeros(self.size, dtype=dtype)
        self.grads: Array = xp.zeros(self.size, dtype=dtype)
        self.nbytes = int(self.params.nbytes)
        for e in entries:
            if share_params_with is None:
                self.params[e.offset:e.end] = e.module.params[e.key].reshape(-1)
            self.grads[e.offset:e.end] = e.module.grads[e.key].reshape(-1)
            e.module.params[e.key] = self.params[e.offset:e.end].reshape(e.shape)
            e.module.grads[e.key] = self.grads[e.offset:e.end].reshape(e.shape)
            _OWNERS[e.module] = weakref.ref(self)

    @property
    def dtype(self) -> Any:
        return self.params.dtype

    def broken_views(self) -> list[str]:
        """Names of ``params.X``/``grads.X`` arrays that are no longer their slice of the buffers."""
        broken = []
        for e in self.entries:
            for what, buffer, store in (("params", self.params, e.module.params),
                                        ("grads", self.grads, e.module.grads)):
                if not _is_slice_view(store.get(e.key), buffer, e):
                    broken.append(f"{what}.{e.name}")
        return broken

    def views_ok(self) -> bool:
        """True when every layer's parameter and gradient arrays are still views of the buffers."""
        return not self.broken_views()

    def check_views(self) -> None:
        """Raise ``RuntimeError`` naming every parameter or gradient array detached from the buffers."""
        broken = self.broken_views()
        if broken:
            raise RuntimeError(
                f"FlatParameters: {', '.join(broken)} no longer view the flat buffer: some code "
                f"rebound the array (e.g. Module.to after flattening, or a layer assigning "
                f"grads[key] = ... instead of writing grads[key][...] = ...); write in place, or "
                f"move/cast the model before building FlatParameters"
            )

    def _check_same_layout(self, other: FlatParameters, xp: Any, dtype: Any) -> None:
        mine = [(e.name, e.offset, e.size, e.shape) for e in self.entries]
        theirs = [(e.name, e.offset, e.size, e.shape) for e in other.entries]
        if mine != theirs or self.size != other.size or get_array_module(other.params) is not xp \
                or other.dtype != dtype:
            raise ValueError(
                "FlatParameters: share_params_with needs a model of the same architecture, array module and "
                f"dtype flattened with the same align; got {other!r} for a model laid out as "
                f"{len(mine)} tensors, size={self.size}, dtype={dtype}"
            )

    def _check_not_flattened(self, named: list[tuple[str, Module, str]]) -> None:
        for name, mod, key in named:
            ref = _OWNERS.get(mod)
            owner = ref() if ref is not None else None
            if owner is not None and owner.views_ok():
                raise RuntimeError(
                    f"FlatParameters: {name!r} already lives in another FlatParameters buffer; "
                    f"reuse that object instead of flattening the model again"
                )

    @staticmethod
    def _common_xp_dtype(named: list[tuple[str, Module, str]]) -> tuple[Any, Any]:
        first_name, first_mod, first_key = named[0]
        first = first_mod.params[first_key]
        xp, dtype = get_array_module(first), first.dtype
        for name, mod, key in named[1:]:
            value = mod.params[key]
            if get_array_module(value) is not xp or value.dtype != dtype:
                raise TypeError(
                    f"FlatParameters: {name!r} is a {get_array_module(value).__name__} {value.dtype} "
                    f"array but {first_name!r} is {xp.__name__} {dtype}; all parameters must share "
                    f"one array module and dtype, convert the model with .to(xp, dtype) first"
                )
        return xp, dtype

    def __repr__(self) -> str:
        return (f"FlatParameters({len(self.entries)} tensors, size={self.size}, "
                f"dtype={self.dtype}, align={self.align})")


def _top_level_owners(model: Module) -> dict[int, int]:
    """``id(layer) -> i`` for every layer inside child ``i`` of a Sequential ``model``."""
    owners: dict[int, int] = {}
    for index, child in enumerate(model.layers if isinstance(model, Sequential) else ()):
        for _, mod in child.named_modules():
            owners[id(mod)] = index
    return owners


def _is_slice_view(arr: Array | None, buffer: Array, entry: FlatEntry) -> bool:
    """Whether ``arr`` is exactly ``buffer[entry.offset:entry.end]`` reshaped (C-contiguous).

    A C-contiguous array of ``entry.size`` elements that overlaps its slice and touches
    nothing of the buffer outside it can only be that slice.
    """
    if arr is None or get_array_module(arr) is not get_array_module(buffer):
        return False
    if tuple(arr.shape) != entry.shape or not arr.flags.c_contiguous or arr.dtype != buffer.dtype:
        return False
    if entry.size == 0:
        return True
    xp = get_array_module(buffer)
    return (
        xp.may_share_memory(arr, buffer[entry.offset:entry.end])
        and not xp.may_share_memory(arr, buffer[:entry.offset])
        and not xp.may_share_memory(arr, buffer[entry.end:])
    )
