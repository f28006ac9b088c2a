"""Real training on the built-in MNIST sample (4,000 train / 1,000 test digits) with the
default settings: the small models must reach 95% test accuracy within 10 epochs, and
AlexNet must learn on a subset."""
from __future__ import annotations

import json

import pytest
from test_app import dtrain, run_dirs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["lenet", "simple_cnn"])
def test_small_models_reach_95_percent_in_10_epochs(tmp_path, model):
    dtrain(tmp_path, f"model={model}", "data=mnist_sample", "trainer.epochs=10", "trainer.progress=false",
           "device=cpu", timeout=900)
    summary = json.loads((run_dirs(tmp_path)[0] / "summary.json").read_text())
    assert summary["epochs"] == 10 and summary["data"] == "mnist_sample"
    assert summary["test_accuracy"] >= 0.95, summary["history"]


def test_alexnet_learns_on_a_subset(tmp_path):
    dtrain(tmp_path, "model=alexnet", "data=mnist_sample", "data.train_size=768", "data.test_size=200",
           "trainer.epochs=2", "trainer.progress=false", "logging.hist_interval=0", "device=cpu", timeout=900)
    summary = json.loads((run_dirs(tmp_path)[0] / "summary.json").read_text())
    first, last = summary["history"][0], summary["history"][-1]
    assert last["train_loss"] < first["train_loss"]
    assert summary["test_accuracy"] > 0.3, summary["history"]  # chance is 0.1
