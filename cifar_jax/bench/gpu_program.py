"""The GPU program, measured without a GPU: what XLA compiles for an H100 or H200 from this
project's own jitted training chunk and fused evaluation, counted kernel by kernel.

    python -m cifar_jax.bench.gpu_program [--target h100|h200] [--cases simple_cnn@32,resnet50@32]
                                          [--modes train,eval] [--population N] [--json FILE]

At CIFAR sizes a GPU step is bound by its kernel launches, not its arithmetic, so launches are the
measure here. For each case (the benchmark's: a model at an image size) and mode it builds the
programs as `train.py` would for that GPU (`model.dtype=auto` is bfloat16 there; the benchmark's
AdamW, label smoothing, crop, flip and colour jitter; steps per call and eval batches per call as on
a GPU), lowers them on shapes placed on a mesh of the target GPU
(`jax.experimental.topologies`, from a GpuTargetConfig in `gpu_targets/`), compiles them, and reads
the optimized program (`compiled.as_text()`): the kernels of the loop body (one training step,
or one evaluation batch) by kind, the kernels outside the loop (once per call), the memory
(`compiled.memory_analysis()`), the compile time, and an estimate of the step's time (`estimate`).
It also reads the thunk sequence XLA runs (dumped while compiling): which of those kernels XLA
replays as CUDA graphs (its command buffers, formed after the HLO is final, so absent from its
text) and so what the host launches per step: one per graph, one per thunk outside a graph.
Without a GPU XLA does not autotune: kernel choices are its defaults, so kernel counts, graphs and
memory are faithful, times are not measured but estimated.

Needs the CUDA plugin (the `gpu-aot` extra: `pip install 'cifar_jax[gpu-aot]'`, about 4 GB) and
runs with JAX_PLATFORMS=cpu (set here unless set): the plugin loads without a driver, and the CPU
stays the default backend.
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
import dataclasses
import json
import os
import re
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

TARGETS = ("h100", "h200")
MODES = ("train", "eval")
DEFAULT_CASES = "simple_cnn@32,resnet34@32,resnet50@32,resnet50@224"
TARGET_DIR = Path(__file__).parent / "gpu_targets"
NUM_TRAIN, NUM_EVAL = 40_000, 10_000  # CIFAR-100's training split and validation split, as in the benchmark

# Operations that launch nothing on the device: control flow and views of buffers.
NOT_LAUNCHES = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "while",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}


# --- reading the optimized program ---------------------------------------------------------------


def computations(hlo: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text; the entry is 'ENTRY'."""
    out, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = "ENTRY" if header.group(1) else header.group(2)
            out[name] = []
        elif name and line.startswith("  ") and " = " in line:
            out[name].append(line.strip())
        elif line.startswith("}"):
            name = None
    return out


def _opcode(line: str) -> str:
    """The operation of an instruction `%name = SHAPE OPCODE(operands), attributes`: the first
    word followed by "(" after a space (a shape, even a tuple's, has none)."""
    found = re.search(r"\s([a-z][\w\-]*)\(", " " + line.split(" = ", 1)[1])
    return found.group(1) if found else "?"


def kind_of(line: str) -> str | None:
    """What a launch is, or None for an operation that launches nothing."""
    op = _opcode(line)
    if op in NOT_LAUNCHES:
        return None
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
        if "cudnn$conv" in target:
            return (
                "cudnn convolution (bias+activation fused)"
                if "BiasActivation" in target
                else "cudnn convolution"
            )
        if "cublas" in target.lower() or "gemm" in target.lower():
            return "cublas gemm"
        return f"custom-call {target}"
    if op == "fusion":
        kind = re.search(r"kind=(k\w+)", line).group(1)
        name = line.split(" = ", 1)[0].lstrip("%").removeprefix("ROOT ").lstrip("%")
        if kind == "kCustom":
            return "triton gemm" if "gemm" in name or "triton" in name else "custom fusion"
        if "convert" in name:
            return "convert fusion"
        if "transpose" in name or "copy" in name:
            return "copy/transpose fusion"
        return "reduction fusion" if kind == "kInput" else "elementwise fusion"
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    return op


@dataclasses.dataclass
class Launches:
    in_loop: Counter  # the loop body's kernels by kind: one training step or one evaluation batch
    outside: Counter  # once per call

    @property
    def per_iteration(self) -> int:
        return sum(self.in_loop.values())


def count_launches(hlo: str) -> Launches:
    """The kernels of a compiled GPU program: those of the body of the entry's outermost while
    loop (`lax.fori_loop` over steps or batches), and the entry's own."""
    comps = computations(hlo)
    entry = comps["ENTRY"]
    loops = [re.search(r"body=%?([\w.\-]+)", line).group(1) for line in entry if _opcode(line) == "while"]
    body = comps[max(loops, key=lambda name: len(comps[name]))] if loops else []

    def kinds(lines):
        return Counter(k for k in map(kind_of, lines) if k is not None)

    return Launches(kinds(body), kinds(entry))


# --- reading the thunk sequence: what the host launches -----------------------------------------

_THUNK = re.compile(r"^( *)\d+: (k\w+)")


@dataclasses.dataclass
class HostLaunches:
    """What the host launches once XLA has put runs of kernels into command buffers (CUDA graphs),
    per iteration of the loop (its condition's one kernel aside, as in the HLO count): `graphs`
    graph launches holding `in_graphs` thunks, and the thunks launched one by one (`alone`, by
    thunk kind; a kConvolution, a cuDNN call this XLA does not capture, ends a graph);
    `outside`: host launches once per call."""

    graphs: int
    in_graphs: int
    alone: Counter
    outside: int

    @property
    def per_iteration(self) -> int:
        return self.graphs + sum(self.alone.values())


def read_thunks(text: str) -> HostLaunches:
    """Read XLA's dumped thunk sequence (`*.thunk_sequence_after_thunk_passes.txt`). Its shape: the
    entry's thunks at indent 0, a command buffer's thunks indented under it, and a while's
    `condition:` and `body:` labels followed by their thunks one level deeper. The loop is the
    entry's while with the longest body."""
    sections, current = [], None  # each: {"label", "entries": [(indent, kind)]}
    top = []
    for line in text.splitlines():
        label = line.strip()
        if label in ("condition:", "body:") and len(line) - len(line.lstrip()) <= 2:
            current = {"label": label, "entries": []}
            sections.append(current)
            continue
        m = _THUNK.match(line)
        if not m:
            continue
        indent, kind = len(m.group(1)), m.group(2)
        if indent == 0:
            current = None
        (current["entries"] if current else top).append((indent, kind))
    bodies = [s["entries"] for s in sections if s["label"] == "body:"]
    body = max(bodies, key=len) if bodies else []

    def launches(entries):
        """(graphs, thunks inside them, thunks alone by kind) of a list at one base indent."""
        graphs, inside, alone, base, in_graph = 0, 0, Counter(), None, False
        for indent, kind in entries:
            base = indent if base is None else base
            if indent == base:
                in_graph = kind == "kCommandBuffer"
                if in_graph:
                    graphs += 1
                elif kind != "kWhile":  # control flow, as in the HLO count
                    alone[kind] += 1
            elif in_graph:
                inside += 1
            else:  # a thunk nested in another than a command buffer (a loop of its own): launched alone
                alone[kind] += 1
        return graphs, inside, alone

    graphs, inside, alone = launches(body)
    top_graphs, _, top_alone = launches(top)
    return HostLaunches(graphs, inside, alone, top_graphs + sum(top_alone.values()))


# --- building the programs as train.py builds them for the GPU ----------------------------------


def target_mesh(target: str):
    """A mesh of one GPU of `target`, which this machine need not have."""
    from jax.experimental import topologies

    proto = (TARGET_DIR / f"{target}.txtpb").read_text()
    topology = topologies.get_topology_desc(platform="cuda", target_config=proto, topology="1x1x1")
    return topologies.make_mesh(topology, (1,), ("data",))


def bench_options(batch_size: int = 128, eval_batch_size: int = 500):
    """The benchmark's options that decide the programs (`bench.jax_side.jax_config`)."""
    return types.SimpleNamespace(
        batch_size=batch_size, eval_batch_size=eval_batch_size, steps_per_call=0, eval_batches_per_call=0
    )


def gpu_config(case, opts):
    """The benchmark's config of `case` as a GPU runs it (`as_on_gpu`)."""
    from cifar_jax.bench.jax_side import jax_config

    return as_on_gpu(jax_config(case, opts))


def as_on_gpu(config):
    """`config` with what `auto` resolves to on a GPU: the bfloat16 compute dtype, and as many steps
    per call as a GPU run fuses (for a NUM_TRAIN-image training split)."""
    from cifar_jax import steps
    from cifar_jax.data import pipeline

    config = config.copy_and_resolve_references()
    if config.model.dtype == "auto":
        config.model.dtype = "bfloat16"
    config.steps_per_call = steps.steps_per_call(
        config, pipeline.steps_per_epoch(NUM_TRAIN, config.batch_size), backend="gpu"
    )
    return config


def lowered_programs(config, mesh, modes=MODES, platforms=None, population: int = 1) -> dict:
    """{name: the jitted program lowered for `mesh`} of `config`: 'train', the trainer's chunk of
    `config.steps_per_call` steps ('train:<phase>' for a later phase of a fine-tune), and 'eval',
    evaluation's fused batches of a NUM_EVAL-image split, lowered for the state's shapes alone.
    `platforms`: lower for these instead of `mesh`'s (how the test suite lowers for CUDA on a CPU
    mesh, without the plugin). `population` > 1: the training chunk of a population of that many
    members (seeds 0..N-1), vmapped as on a GPU."""
    import jax
    import jax.numpy as jnp

    from cifar_jax import phases, sharding, steps, train_state
    from cifar_jax import population as population_lib
    from cifar_jax.data import pipeline
    from cifar_jax.models import layers

    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batches = sharding.batch_sharding(mesh)
    preprocess = pipeline.Preprocess.from_config(config.data)
    num_classes = config.model.num_classes
    ops = layers.for_platforms(platforms) if platforms else train_state.mesh_ops(mesh)
    graphdefs, model_state = train_state.state_shapes(config, num_classes, mesh, ops=ops)

    def shaped(tree, where=replicated):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), tree)

    def scalar():
        return jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    out = {}
    for i, phase in enumerate(phases.phases(config) if "train" in modes else []):
        step_cfg, _ = phases.step_config(
            config,
            phase,
            graphdefs,
            preprocess=preprocess,
            num_classes=num_classes,
            steps_per_epoch=pipeline.steps_per_epoch(NUM_TRAIN, config.batch_size),
            sharding=batches,
        )
        init_opt_state = lambda params: train_state.init_opt_state(
            step_cfg.tx, params, graphdefs, phase, mesh
        )
        state = {**model_state, "opt_state": jax.eval_shape(init_opt_state, model_state["params"])}
        images = jax.ShapeDtypeStruct((NUM_TRAIN, 32, 32, 3), jnp.uint8, sharding=replicated)
        labels = jax.ShapeDtypeStruct((NUM_TRAIN,), jnp.int32, sharding=replicated)
        votes = jax.ShapeDtypeStruct((mesh.size,), jnp.int32, sharding=batches)
        if population == 1:
            chunk = steps.make_train_chunk(step_cfg, config.steps_per_call)
            sums, order, numbers = steps.zero_metrics(), labels, None
        else:
            seeded = config.copy_and_resolve_references()
            seeded.population.seeds = ",".join(map(str, range(population)))
            members = population_lib.members(seeded)
            spe = pipeline.steps_per_epoch(NUM_TRAIN, config.batch_size)
            member_cfg = phases.member_step_config(config, phase, step_cfg, spe, members)
            chunk = steps.make_train_chunk(step_cfg, config.steps_per_call, member_cfg, vectorize=True)
            state = jax.tree.map(lambda a: jnp.zeros((population, *a.shape), a.dtype), state)
            sums = {k: jnp.zeros((population,), v.dtype) for k, v in steps.zero_metrics().items()}
            order = jax.ShapeDtypeStruct((population, NUM_TRAIN), jnp.int32, sharding=replicated)
            numbers = [population_lib.numbers(m.config, phase.lr) for m in members]
            numbers = {
                k: jnp.asarray([n[k] for n in numbers], jnp.int32 if k == "seed" else None)
                for k in numbers[0]
            }
            numbers = shaped(numbers)
        args = (shaped(state), shaped(sums), images, labels, order, scalar(), scalar(), votes, numbers)
        out["train" if i == 0 else f"train:{phase.name}"] = chunk.trace(*args).lower(
            lowering_platforms=platforms
        )
    if "eval" in modes:
        batch_logits = steps.make_batch_logits(
            graphdefs.eval, preprocess=preprocess, batch_size=config.eval_batch_size, sharding=batches
        )
        num_batches = pipeline.num_eval_batches(NUM_EVAL, config.eval_batch_size)
        per_call, _ = steps.eval_calls(num_batches, steps.eval_batches_per_call(config))
        images = jax.ShapeDtypeStruct((NUM_EVAL, 32, 32, 3), jnp.uint8, sharding=replicated)
        weights = shaped(model_state["params"]), shaped(model_state["batch_stats"])
        traced = batch_logits.trace(*weights, images, scalar(), per_call=per_call)
        out["eval"] = traced.lower(lowering_platforms=platforms)
    return out


# --- the estimate --------------------------------------------------------------------------------

# t = (launches + launches outside the loop / iterations per call) * LAUNCH_US + GFLOP / TFLOPS, per
# training step or evaluation batch: a launch-bound model with a throughput term. Both constants are a
# least-squares fit (of relative error) to the six H100 rows of 2026-11-27 that this tool compiles
# (benchmarks/h100_2026-11-27_second.json: SimpleCNN, ResNet-34 and ResNet-50 at 32x32, train and
# eval); its error on each is in BENCHMARKS.md (-50% to +35%): an estimate, not a measurement.
LAUNCH_US = 3.8
EFFECTIVE_TFLOPS = 357.0


def estimate_ms(launches: int, outside: int, per_call: int, gflop: float) -> float:
    return (launches + outside / per_call) * LAUNCH_US / 1000 + gflop / EFFECTIVE_TFLOPS


def gflop_per_iteration(lowered) -> float | None:
    """GFLOP of one training step or evaluation batch: XLA's HLO cost analysis of the lowered (not yet
    optimized) program, which counts a loop's body once, whatever its trip count. JAX offers it
    publicly only for its own backend's lowerings: the CPU client analyses the GPU lowering here
    (None where this jaxlib's internals differ)."""
    import jax

    try:
        from jax._src.lib import _jax

        module = lowered._lowering.hlo().as_hlo_module()
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    except Exception:  # noqa: BLE001  (an internal API: any change of it)
        return None
    return float(cost["flops"]) / 1e9 if "flops" in cost else None


# --- the command --------------------------------------------------------------------------------


def thunk_sequence(dump: Path) -> str:
    """The thunk sequence of the one program compiled into `dump` (XLA writes the one after its
    thunk passes only where they changed something)."""
    for pattern in ("*.thunk_sequence_after_thunk_passes.txt", "*.thunk_sequence.txt"):
        found = sorted(dump.glob(pattern))
        if found:
            return found[-1].read_text()
    raise RuntimeError(f"XLA wrote no thunk sequence into {dump}")


# Without a device XLA cannot autotune, and for some float32 GEMMs (ResNet-50@224's resize) it finds no
# Triton tiling and fails; such a program is compiled again with its GEMMs on cuBLAS, and its row says so.
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def measure(case, mode: str, target: str, config, lowered, population: int = 1) -> dict:
    """One row: the compiled program's launches, memory and compile time, and the estimate."""
    with tempfile.TemporaryDirectory() as dump:
        t0 = time.perf_counter()
        try:
            compiled, note = lowered.compile(compiler_options={"xla_dump_to": dump}), None
        except Exception as e:  # noqa: BLE001  (JaxRuntimeError)
            if "tile sizes" not in str(e):
                raise
            compiled, note = (
                lowered.compile(compiler_options={**NO_TRITON_GEMM, "xla_dump_to": dump}),
                "GEMMs on cuBLAS (no Triton tiling found without autotuning)",
            )
        compile_s = time.perf_counter() - t0
        host = read_thunks(thunk_sequence(Path(dump)))
    launches = count_launches(compiled.as_text())
    memory = compiled.memory_analysis()
    gflop = gflop_per_iteration(lowered)
    per_call = config.steps_per_call if mode == "train" else -(-NUM_EVAL // config.eval_batch_size)
    outside = sum(launches.outside.values())
    return {
        "case": f"{case.model}@{case.image_size}",
        "mode": mode,
        "target": target,
        "population": population if mode == "train" else 1,
        "dtype": config.model.dtype,
        "batch_size": config.batch_size if mode == "train" else config.eval_batch_size,
        "per_call": per_call,
        "launches": launches.per_iteration,
        "by_kind": dict(launches.in_loop.most_common()),
        "outside_loop": outside,
        "host_launches": host.per_iteration,
        "graphs": host.graphs,
        "in_graphs": host.in_graphs,
        "alone": dict(host.alone.most_common()),
        "host_outside_loop": host.outside,
        "argument_mb": round(memory.argument_size_in_bytes / 2**20, 1),
        "temp_mb": round(memory.temp_size_in_bytes / 2**20, 1),
        "compile_s": round(compile_s, 1),
        "note": note,
        "xla_flags": os.environ.get("XLA_FLAGS") or None,
        "gflop": None if gflop is None else round(gflop, 2),
        "estimate_ms": None
        if gflop is None
        else round(estimate_ms(launches.per_iteration, outside, per_call, gflop), 3),
    }


def failed_row(case, mode: str, target: str, config, e: Exception, population: int = 1) -> dict:
    """A row for a program XLA could not compile without the device (no autotuning: a Triton tiling it
    cannot choose), with the error's first line."""
    from cifar_jax.errors import one_line

    return {
        "case": f"{case.model}@{case.image_size}",
        "mode": mode,
        "target": target,
        "population": population if mode == "train" else 1,
        "dtype": config.model.dtype,
        "launches": None,
        "error": one_line(e, 200),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| case | mode | target | kernels | of which | outside | host launches (graphs + alone) "
        "| args MB | temp MB | compile s | est. ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["launches"] is None:
            why = f"does not compile without a GPU: {r['error']}"
            lines.append(f"| {r['case']} | {r['mode']} | {r['target']} | {why} |")
            continue
        kinds = ", ".join(f"{n} {k}" for k, n in r["by_kind"].items())
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['target']} | {r['launches']}{' *' if r.get('note') else ''} "
            f"| {kinds} | {r['outside_loop']} "
            f"| {r['host_launches']} ({r['graphs']} + {r['host_launches'] - r['graphs']}) "
            f"| {r['argument_mb']} | {r['temp_mb']} | {r['compile_s']} | {r['estimate_ms']} |"
        )
    notes = sorted({r["note"] for r in rows if r.get("note")})
    return "\n".join(lines + [f"\n* {note}" for note in notes])


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.bench.gpu_program",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="h100", choices=TARGETS, help="the GPU (default: %(default)s)")
    p.add_argument("--cases", default=DEFAULT_CASES, help="model@size list (default: %(default)s)")
    p.add_argument("--modes", default="train,eval", help="train, eval or both (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=128, help="training batch (default: %(default)s)")
    p.add_argument("--eval_batch_size", type=int, default=500, help="evaluation batch (default: %(default)s)")
    p.add_argument(
        "--population", type=int, default=1, help="training: a population of N members, vmapped (default: 1)"
    )
    p.add_argument("--json", help="write the rows as a JSON list here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from cifar_jax import cli, staging
    from cifar_jax.bench.cases import BenchError, parse_cases

    opts = parse_args(argv)
    modes = [m for m in opts.modes.split(",") if m]
    try:
        cases = parse_cases(opts.cases, None, None)
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise BenchError(f"--modes: {', '.join(unknown)} unknown; choose from {', '.join(MODES)}")
    except BenchError as e:
        cli.fail(str(e))
    try:
        mesh = target_mesh(opts.target)
    except Exception as e:  # noqa: BLE001  (no plugin: RuntimeError, ValueError, ImportError by version)
        cli.fail(
            f"cannot compile for a CUDA GPU here ({str(e).splitlines()[0][:120]}): install the CUDA "
            "plugin with pip install 'cifar_jax[gpu-aot]' (about 4 GB)"
        )
    # Every program is compiled here, never read from a persistent cache ($JAX_COMPILATION_CACHE_DIR):
    # its compile time is measured and its thunk sequence is read from what the compile dumps.
    rows = []
    with cli.without_compilation_cache():
        for case in cases:
            config = gpu_config(case, bench_options(opts.batch_size, opts.eval_batch_size))
            programs = lowered_programs(config, mesh, modes, population=opts.population)
            for mode in modes:
                print(f"compiling {case} {mode} for the {opts.target.upper()} ...", flush=True)
                try:
                    rows.append(measure(case, mode, opts.target, config, programs[mode], opts.population))
                except Exception as e:  # noqa: BLE001  (XLA's deviceless compile fails on some programs)
                    rows.append(failed_row(case, mode, opts.target, config, e, opts.population))
                    print(f"  does not compile without a GPU: {rows[-1]['error']}")
                    continue
                r = rows[-1]
                per = "step" if mode == "train" else "batch"
                print(
                    f"  {r['launches']} kernels per {per}: {r['by_kind']}\n"
                    f"  {r['host_launches']} host launches per {per}: {r['graphs']} CUDA graphs of "
                    f"{r['in_graphs']} kernels, alone {r['alone']}"
                )
                if opts.json:
                    staging.write_text(Path(opts.json), json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    from cifar_jax import cli

    cli.run(main, "while compiling for the GPU", absl_flags=False)
