"""The GPU program of every shipped config lowers for CUDA on this machine, without a GPU and
without the CUDA plugin: a change that breaks only the GPU program fails here. (Compiling it and
counting its launches needs the plugin: `python -m cifar_jax.bench.gpu_program`.)"""

import glob
import importlib.util
import os

import pytest

from cifar_jax import sharding
from cifar_jax.bench import gpu_program
from tests.support.helpers import ROOT

CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n for n in CONFIGS]
)
def test_every_shipped_config_lowers_for_cuda(name):
    """Lowering for CUDA takes the GPU's side of every `lax.platform_dependent` choice and the
    GPU's dtype: what breaks there (an operation without a CUDA lowering, a shape that only the
    GPU dtype or chunking produces) raises here."""
    config = gpu_program.as_on_gpu(_config(name))
    programs = gpu_program.lowered_programs(config, sharding.make_mesh(), platforms=("cuda",))
    phases = ["train"] + (["train:all"] if config.head_only_epochs else [])
    assert sorted(programs) == sorted(phases + ["eval"])
    for lowered in programs.values():
        text = lowered.as_text()
        assert "stablehlo.convolution" in text and "bf16" in text  # the model, in the GPU's dtype


def test_a_population_lowers_for_cuda_with_the_operations_of_one_member():
    """On a GPU the members are vmapped: each convolution of the step is one convolution over all
    members (as many as one member's program has), not one per member."""
    config = gpu_program.as_on_gpu(_config("simple_cnn_tuned"))
    mesh = sharding.make_mesh()

    def convolutions(population):
        programs = gpu_program.lowered_programs(
            config, mesh, modes=("train",), platforms=("cuda",), population=population
        )
        return programs["train"].as_text().count("stablehlo.convolution")

    one, eight = convolutions(1), convolutions(8)
    assert one > 0 and eight == one


def test_device_programs_ask_for_cuda_graphs_of_two_kernels_unless_xla_flags_name_the_option(monkeypatch):
    from cifar_jax import steps

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    assert steps.xla_options() == {"xla_gpu_graph_min_graph_size": 2}
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=5")
    assert steps.xla_options() == {}
