"""Every config in configs/ loads and passes validation, and says what it reproduces."""

import importlib
import pkgutil

import pytest

import configs
from cifar_jax import config as config_lib

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def test_the_study_and_recipe_configs_are_all_there():
    assert {
        "simple_cnn",
        "simple_cnn_writeup",
        "simple_cnn_tuned",
        "resnet34",
        "resnet50_ft",
        "resnet18_recipe",
        "resnet50_ft_recipe",
        "quickstart",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_documents_itself(name):
    module = importlib.import_module(f"configs.{name}")
    config_lib.validate(module.get_config())
    assert module.__doc__ and "python train.py --config configs/" in module.__doc__


def test_the_study_readings_and_their_overrides():
    part1 = importlib.import_module("configs.simple_cnn").get_config()
    assert (part1.optimizer.name, part1.optimizer.lr, part1.optimizer.weight_decay) == ("adam", 1e-3, 5e-4)
    assert (
        part1.schedule.name,
        part1.schedule.step_size,
        part1.schedule.gamma,
        part1.data.normalization,
    ) == ("step", 2, 0.1, "half")
    assert importlib.import_module("configs.simple_cnn_writeup").get_config().optimizer.lr == 0.1
    part3 = importlib.import_module("configs.resnet50_ft").get_config()
    assert (part3.optimizer.name, part3.head_only_batchnorm, part3.head_only_epochs, part3.num_epochs) == (
        "adam",
        "train",
        10,
        110,
    )
