from cifar_jax.bench.cli import main

main()
