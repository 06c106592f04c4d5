"""What the subprocess probes share: joining a multi-process run when the test asks for one."""

import os

import jax


def join_distributed_from_env() -> None:
    """With PROBE_PROCESS_ID / PROBE_NUM_PROCESSES / PROBE_COORDINATOR set, join a multi-process run
    through jax.distributed (CPU collectives over gloo); call before anything touches a device."""
    if "PROBE_NUM_PROCESSES" in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["PROBE_COORDINATOR"],
            num_processes=int(os.environ["PROBE_NUM_PROCESSES"]),
            process_id=int(os.environ["PROBE_PROCESS_ID"]),
        )
