from cifar_jax import interrupts

interrupts.defer()  # a Ctrl-C during the imports is acted on once they are done (cli.run)
from cifar_jax import cli  # noqa: E402
from cifar_jax.bench.cli import main  # noqa: E402

cli.run(main, "during the benchmark", absl_flags=False)
