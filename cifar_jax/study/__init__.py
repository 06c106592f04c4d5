"""The whole study in one command, and RESULTS.md's tables written from the runs' own records.

    python -m cifar_jax.study --parts 1,2,3 --seeds 0,1,2 --data ../shared/data/cifar100/cifar100.npz --torch
    python -m cifar_jax.study --parts 1,2,3 --scale smoke --out /tmp/s      # minutes on a CPU
    python -m cifar_jax.study report --records results/records --out RESULTS.md

`cells.py`: the study's parts and figures; `runs.py`: training, evaluation and the records;
`report.py`: the tables from the records.
"""
