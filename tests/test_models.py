"""The YAML model builder: shipped models, shape checks at build time, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from dtrain.config import load_model_spec
from dtrain.models import build_model


def _spec(name: str) -> dict:
    return load_model_spec(name)


@pytest.mark.parametrize("name, params", [("alexnet", 24_735_434), ("lenet", 44_426), ("simple_cnn", 556_072)])
def test_shipped_models_build_with_expected_size(name, params):
    model = build_model(_spec(name), seed=0)
    assert model.num_parameters() == params
    assert model.output_shape((1, 28, 28)) == (10,)


def test_alexnet_flops_per_training_step():
    model = build_model(_spec("alexnet"), seed=0)
    forward = model.flops((1, 28, 28))
    # forward + backward (input and weight gradients) is about 3x the forward pass
    assert 1.40e9 < 3 * forward < 1.46e9


def test_same_seed_same_weights_and_different_seed_differs():
    a = build_model(_spec("lenet"), seed=3).state_dict()
    b = build_model(_spec("lenet"), seed=3).state_dict()
    c = build_model(_spec("lenet"), seed=4).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_model_defined_in_yaml_alone_trains_a_forward_pass():
    spec = OmegaConf.to_container(OmegaConf.create("""
        name: tiny
        input_shape: [1, 8, 8]
        layers:
          - {type: Conv2d, in_channels: 1, out_channels: 4, kernel_size: [3, 2], stride: 1, padding: 1}
          - {type: BatchNorm2d, num_features: 4}
          - {type: LeakyReLU, negative_slope: 0.1}
          - {type: AvgPool2d, kernel_size: 2}
          - {type: Flatten}
          - {type: Linear, in_features: 64, out_features: 3, init: xavier_normal}
    """))
    model = build_model(spec, seed=0)
    out = model.forward(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
    assert out.shape == (2, 3)


def test_channel_mismatch_is_reported_at_build_time_with_the_layer():
    spec = _spec("lenet")
    spec["layers"][3]["in_channels"] = 7
    with pytest.raises(ValueError, match=r"lenet.*Conv2d"):
        build_model(spec)


def test_unknown_layer_type_lists_valid_types():
    spec = {"name": "bad", "layers": [{"type": "Conv3d"}]}
    with pytest.raises(ValueError, match=r"layer 0: unknown layer type 'Conv3d'.*Conv2d"):
        build_model(spec)


def test_bad_layer_argument_names_the_layer():
    spec = {"name": "bad", "layers": [{"type": "ReLU", "inplace": True}]}
    with pytest.raises(ValueError, match=r"layer 0 \(ReLU\)"):
        build_model(spec)


def test_model_must_end_in_a_vector():
    spec = {"name": "bad", "input_shape": [1, 8, 8],
            "layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3}]}
    with pytest.raises(ValueError, match="Flatten"):
        build_model(spec)
