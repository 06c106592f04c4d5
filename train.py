"""Train a config:  python train.py --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR]

The workdir (default checkpoints/<config name>) receives config.json, metrics.jsonl, curves.png and
Orbax checkpoints; running the same command again resumes from the latest checkpoint.
"""

from pathlib import Path

from cifar_jax import interrupts

interrupts.defer()  # a Ctrl-C during the imports is acted on once they are done (cli.run)
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py: the experiment", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: checkpoints/<config name>)")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "persistent XLA cache dir ('' disables; default $JAX_COMPILATION_CACHE_DIR or ~/.cache/cifar_jax/xla)",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar per epoch")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: HOST:PORT of process 0 (with --num_processes, --process_id)"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: how many processes take part")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-process: this process's index, 0 .. num_processes-1"
)
flags.mark_flag_as_required("config")


def main(argv):
    from cifar_jax import cli

    cli.start(_CACHE.value, argv)
    import logging

    from cifar_jax.data import DataError
    from cifar_jax.runguard import WorkdirBusy
    from cifar_jax.trainer import TrainingError, train_and_evaluate

    config = cli.loaded_config(_CONFIG)
    config_name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = _WORKDIR.value or str(Path("checkpoints") / config_name)
    try:
        cluster = {
            "coordinator_address": _COORDINATOR.value,
            "num_processes": _NUM_PROCESSES.value,
            "process_id": _PROCESS_ID.value,
        }
        train_and_evaluate(
            config,
            workdir,
            progress=_PROGRESS.value,
            cluster=cluster if any(v is not None for v in cluster.values()) else None,
        )
        logging.getLogger("cifar_jax").info(cli.compilation_summary())
    except (ValueError, DataError, TrainingError, WorkdirBusy, FileNotFoundError, ImportError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    from cifar_jax.cli import run

    run(main, "outside the training loop")
