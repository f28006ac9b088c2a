"""Optimizers on a flat buffer against torch.optim, fed the same gradient sequence."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from dtrain.backend import to_host
from dtrain.nn import blocks
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Module, Sequential
from dtrain.optim import OPTIMIZERS, SGD, Adam, AdamW, RMSprop, build_optimizer
from dtrain.optim import base as optim_base

SHAPES = [[(4, 3), (3,)], [(2, 3, 5), (1,), (7,)]]
STEPS = 12


class ParamBag(Module):
    """A layer that only holds parameters (the optimizers never call forward)."""

    def __init__(self, xp, values: list[np.ndarray], dtype) -> None:
        super().__init__()
        for i, v in enumerate(values):
            self.register_param(f"p{i}", xp.asarray(v, dtype=dtype))


class Problem:
    """The same parameters as a flattened dtrain model and as torch tensors."""

    def __init__(self, xp, dtype, align: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        values = [[rng.standard_normal(s) for s in shapes] for shapes in SHAPES]
        self.xp = xp
        self.model = Sequential(*(ParamBag(xp, v, dtype) for v in values))
        self.flat = FlatParameters(self.model, align=align)
        self.torch_params = [torch.tensor(v, dtype=getattr(torch, np.dtype(dtype).name), requires_grad=True)
                             for vs in values for v in vs]
        self.grad_rng = np.random.default_rng(seed + 1)

    def feed_gradients(self) -> None:
        """Draw one random gradient per parameter and give it to both sides."""
        for e, tp in zip(self.flat.entries, self.torch_params):
            g = self.grad_rng.standard_normal(e.shape)
            e.module.grads[e.key][...] = self.xp.asarray(g)
            tp.grad = torch.tensor(g, dtype=tp.dtype)

    def values(self) -> np.ndarray:
        """The parameters (without alignment padding) as one host vector."""
        return np.concatenate([to_host(e.module.params[e.key]).ravel() for e in self.flat.entries])

    def torch_values(self) -> np.ndarray:
        return np.concatenate([tp.detach().numpy().ravel() for tp in self.torch_params])

    def padding(self) -> np.ndarray:
        used = np.zeros(self.flat.size, dtype=bool)
        for e in self.flat.entries:
            used[e.offset:e.end] = True
        return to_host(self.flat.params)[~used]


def lr_of_step(base: float, t: int) -> float:
    """A learning rate that changes every step, so the tests check that ``lr`` is honoured."""
    return base * (1.0 + 0.1 * t)


def torch_optimizer(kind: str, params, lr: float, options: dict) -> torch.optim.Optimizer:
    options = dict(options)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, **options)
    if kind == "adam":
        cls = torch.optim.AdamW if options.pop("decoupled", False) else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=options.pop("weight_decay", 0.0), **options)
    return torch.optim.RMSprop(params, lr=lr, **options)


def run_against_torch(xp, dtype, kind: str, lr: float, options: dict, rtol: float) -> None:
    prob = Problem(xp, dtype)
    ours = build_optimizer(kind, prob.flat, lr=lr, **options)
    theirs = torch_optimizer(kind, prob.torch_params, lr, options)
    for t in range(STEPS):
        prob.feed_gradients()
        ours.lr = lr_of_step(lr, t)
        for group in theirs.param_groups:
            group["lr"] = lr_of_step(lr, t)
        ours.step()
        theirs.step()
        expected = prob.torch_values()
        err = np.max(np.abs(prob.values() - expected)) / np.max(np.abs(expected))
        assert err < rtol, f"step {t + 1}: relative error {err:.3g}"
    assert ours.step_count == STEPS
    assert np.all(prob.padding() == 0)
    assert prob.flat.views_ok()


SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.01},
    {"momentum": 0.9, "weight_decay": 0.01},
    {"momentum": 0.8, "dampening": 0.5, "weight_decay": 0.02},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
]
ADAM_CASES = [
    {},
    {"weight_decay": 0.05},
    {"weight_decay": 0.05, "decoupled": True},
    {"decoupled": True},
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01},
]
RMSPROP_CASES = [
    {"centered": centered, "momentum": momentum, "weight_decay": wd}
    for centered in (False, True) for momentum in (0.0, 0.9) for wd in (0.0, 0.01)
] + [{"alpha": 0.9, "eps": 1e-6}]
CASES = ([("sgd", 0.1, c) for c in SGD_CASES] + [("adam", 1e-2, c) for c in ADAM_CASES]
         + [("rmsprop", 1e-2, c) for c in RMSPROP_CASES])


@pytest.mark.parametrize("kind, lr, options", CASES, ids=[f"{k}-{o}" for k, _, o in CASES])
def test_matches_torch_float64(xp, kind, lr, options):
    run_against_torch(xp, np.float64, kind, lr, options, rtol=1e-10)


@pytest.mark.parametrize(
    "kind, lr, options",
    [("sgd", 0.1, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
     ("adam", 1e-2, {"weight_decay": 0.05, "decoupled": True}),
     ("rmsprop", 1e-2, {"centered": True, "momentum": 0.9, "weight_decay": 0.01})],
)
def test_matches_torch_float32(xp, kind, lr, options):
    run_against_torch(xp, np.float32, kind, lr, options, rtol=1e-5)


@pytest.mark.parametrize("kind, lr, options", CASES, ids=[f"{k}-{o}" for k, _, o in CASES])
def test_matches_torch_in_tiny_blocks_on_two_threads(kind, lr, options, monkeypatch):
    # Blocks of one or two elements: every slice of every state buffer must line up.
    monkeypatch.setattr(optim_base, "UPDATE_BLOCK_BYTES", 64)
    monkeypatch.setattr(blocks, "THREAD_MIN_BYTES", 1)  # the second thread takes part despite tiny work
    with threadpool_limits(limits=2, user_api="blas"):
        run_against_torch(np, np.float64, kind, lr, options, rtol=1e-12)


FUSED_CASES = [("sgd", 0.1, c) for c in SGD_CASES] + [("adam", 1e-2, c) for c in ADAM_CASES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, lr, options", FUSED_CASES, ids=[f"{k}-{o}" for k, _, o in FUSED_CASES])
def test_fused_cpu_update_gives_the_chains_bits(kind, lr, options, dtype, monkeypatch):
    """SGD and Adam run one fused pass on the CPU (dtrain.optim.cpu_updates); the array
    chain of ``_update`` (what the GPU runs) gives bitwise the same parameters and state."""
    def run(fused: bool) -> tuple[np.ndarray, ...]:
        prob = Problem(np, dtype)
        opt = build_optimizer(kind, prob.flat, lr=lr, **options)
        if not fused:
            monkeypatch.setattr(opt, "_fused_update", lambda t: None)
        for t in range(STEPS):
            prob.feed_gradients()
            opt.lr = lr_of_step(lr, t)
            opt.step()
        assert (opt._tmp is None) == fused  # the fused pass needs no scratch buffer
        return (prob.flat.params.copy(), *(buf.copy() for buf in opt.state.values()))

    for fused, chain in zip(run(True), run(False)):
        np.testing.assert_array_equal(fused, chain)


def test_adamw_is_decoupled_adam():
    prob = Problem(np, np.float64)
    opt = build_optimizer("adamw", prob.flat, lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW(prob.torch_params, lr=1e-2, weight_decay=0.05)
    assert isinstance(opt, AdamW) and opt.decoupled
    for _ in range(STEPS):
        prob.feed_gradients()
        opt.step()
        reference.step()
    np.testing.assert_allclose(prob.values(), prob.torch_values(), rtol=1e-10, atol=1e-12)


ROUND_TRIP = [("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
              ("adam", {"weight_decay": 0.05, "decoupled": True}),
              ("rmsprop", {"centered": True, "momentum": 0.9, "weight_decay": 0.01})]


@pytest.mark.parametrize("kind, options", ROUND_TRIP)
def test_state_dict_round_trip_continues_identically(xp, kind, options):
    def run(prob, opt, steps):
        for t in steps:
            prob.feed_gradients()
            opt.lr = lr_of_step(1e-2, t)
            opt.step()

    whole = Problem(xp, np.float64)
    run(whole, build_optimizer(kind, whole.flat, lr=1e-2, **options), range(10))

    first = Problem(xp, np.float64)
    opt = build_optimizer(kind, first.flat, lr=1e-2, **options)
    run(first, opt, range(4))
    saved = opt.state_dict()
    assert saved["step"] == 4 and saved["optimizer"] == type(opt).__name__
    assert saved["hyperparameters"] == opt.hyperparameters()
    for arr in saved["state"].values():
        assert isinstance(arr, np.ndarray) and arr.shape == (first.flat.size,)

    resumed = Problem(xp, np.float64)
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.grad_rng = first.grad_rng
    fresh = build_optimizer(kind, resumed.flat, lr=0.5, **{**options, "weight_decay": 0.3})
    fresh.load_state_dict(saved)
    assert fresh.step_count == 4 and fresh.hyperparameters() == opt.hyperparameters()
    run(resumed, fresh, range(4, 10))
    np.testing.assert_array_equal(resumed.values(), whole.values())


def test_state_dict_is_a_copy():
    prob = Problem(np, np.float64)
    opt = SGD(prob.flat, lr=0.1, momentum=0.9)
    prob.feed_gradients()
    opt.step()
    saved = opt.state_dict()
    saved["state"]["momentum_buffer"][...] = 123.0
    assert not np.any(to_host(opt.state["momentum_buffer"]) == 123.0)


def test_load_state_dict_rejects_mismatches():
    prob = Problem(np, np.float64)
    sgd = SGD(prob.flat, lr=0.1, momentum=0.9)
    saved = sgd.state_dict()
    with pytest.raises(ValueError, match="saved by SGD, not Adam"):
        Adam(prob.flat).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"saved state buffers are \['momentum_buffer'\] but this optimizer has \[\]"):
        SGD(prob.flat, lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="expected a dict with keys"):
        sgd.load_state_dict({"step": 3})
    other = Problem(np, np.float64, align=1)
    with pytest.raises(ValueError, match=r"'momentum_buffer' has shape \(72,\), the flat parameter buffer has \(53,\)"):
        SGD(other.flat, lr=0.1, momentum=0.9).load_state_dict(saved)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        sgd.load_state_dict({**saved, "step": -1})
    bad = {**saved, "hyperparameters": {**saved["hyperparameters"], "lr": -1.0, "momentum": 0.5}}
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, inf\)"):
        sgd.load_state_dict(bad)
    assert sgd.lr == 0.1 and sgd.momentum == 0.9
    no_momentum = {**saved, "hyperparameters": {**saved["hyperparameters"], "momentum": 0.0}}
    with pytest.raises(ValueError, match="need state buffers"):
        sgd.load_state_dict(no_momentum)
    assert sgd.momentum == 0.9


@pytest.mark.parametrize("kind, options", [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
                                           ("adam", {"weight_decay": 0.1}),
                                           ("rmsprop", {"centered": True, "momentum": 0.9, "weight_decay": 0.1})])
def test_step_allocates_nothing_and_leaves_grads_alone(kind, options):
    # a buffer big enough that any temporary array would stand out from interpreter noise
    big = Sequential(ParamBag(np, [np.random.default_rng(0).standard_normal(50_000)], np.float64))
    flat = FlatParameters(big)
    opt = build_optimizer(kind, flat, lr=1e-3, **options)
    flat.grads[...] = 1.0
    opt.step()  # the first step may allocate the weight-decay scratch buffer once
    params_id, grads_before = id(flat.params), flat.grads.copy()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        current = tracemalloc.get_traced_memory()[0]
        opt.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - current < flat.nbytes // 10, f"step allocated {peak - current} bytes"
    assert id(flat.params) == params_id and flat.views_ok()
    np.testing.assert_array_equal(flat.grads, grads_before)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SGD, {"lr": -0.1}, r"SGD: lr must be a number in \[0, inf\)"),
        (SGD, {"lr": "0.1"}, "SGD: lr must be a number"),
        (SGD, {"lr": 0.1, "momentum": 1.5}, "SGD: momentum must be a number in"),
        (SGD, {"lr": 0.1, "nesterov": True}, "nesterov=True needs momentum > 0"),
        (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "dampening = 0"),
        (SGD, {"lr": 0.1, "weight_decay": -1}, "SGD: weight_decay must be a number in"),
        (Adam, {"betas": (1.0, 0.9)}, r"Adam: betas\[0\] must be a number in \[0, 1\)"),
        (Adam, {"betas": 0.9}, "Adam: betas must be a pair"),
        (Adam, {"eps": 0.0}, r"Adam: eps must be a number in \(0, inf\)"),
        (Adam, {"decoupled": "yes"}, "Adam: decoupled must be true or false"),
        (RMSprop, {"alpha": 1.0}, "RMSprop: alpha must be a number in"),
        (RMSprop, {"centered": 1}, "RMSprop: centered must be true or false"),
        (RMSprop, {"lr": float("nan")}, "RMSprop: lr must be a number in"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(Problem(np, np.float64).flat, **kwargs)


def test_lr_setter_validates():
    opt = SGD(Problem(np, np.float64).flat, lr=0.1)
    opt.lr = 0.05
    assert opt.lr == 0.05
    with pytest.raises(ValueError, match="SGD: lr must be a number in"):
        opt.lr = -1.0


def test_hydra_style_betas_list_is_accepted():
    opt = Adam(Problem(np, np.float64).flat, betas=[0.8, 0.9])
    assert opt.betas == (0.8, 0.9)


def test_optimizer_needs_intact_flat_parameters():
    prob = Problem(np, np.float64)
    with pytest.raises(TypeError, match="needs a FlatParameters"):
        SGD(prob.model, lr=0.1)
    prob.model[0].params["p0"] = prob.model[0].params["p0"].copy()
    with pytest.raises(RuntimeError, match=r"params\.0\.p0 no longer view"):
        SGD(prob.flat, lr=0.1)


def test_build_optimizer_registry():
    flat = Problem(np, np.float64).flat
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "rmsprop"}
    assert isinstance(build_optimizer("SGD", flat, lr=0.1, momentum=0.9), SGD)
    assert isinstance(build_optimizer("rmsprop", flat), RMSprop)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; choose one of adam, adamw, rmsprop, sgd"):
        build_optimizer("lamb", flat)
    with pytest.raises(ValueError, match="SGD has no option.s. momentun; its options are lr, momentum"):
        build_optimizer("sgd", flat, lr=0.1, momentun=0.9)
    with pytest.raises(ValueError, match="AdamW has no option.s. decoupled"):
        build_optimizer("adamw", flat, decoupled=False)
