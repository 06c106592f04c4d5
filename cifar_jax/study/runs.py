"""Training and evaluating the study's cells, and the record each run leaves.

A cell's JAX runs are one population over the seeds (`train.py --config.population.seeds=...`),
each member then evaluated on its last epoch (`eval.py --member k --step N`); its PyTorch runs
(`bench.reference`, where that loop can train the config) go one seed after another and evaluate
their last epoch too, so both columns hold the same checkpoint rule. Every finished run leaves
`<out>/records/<name>.json`, with its `metrics.jsonl` and `report.json` in `<out>/records/<name>/`.
A rerun skips the runs whose record exists; `train.py` resumes an interrupted population from its
checkpoints, a PyTorch run starts again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cifar_jax import provenance, staging
from cifar_jax.bench import compare
from cifar_jax.study.cells import Cell

ROOT = compare.ROOT
# Smoke scale: every cell on 256 training images of the bundled digits (real, offline) for two
# epochs, so the whole pipeline runs in minutes on a CPU (it checks the pipeline, not what a model
# learns); a fine-tune starts from a torchvision ResNet-50 of random weights (`smoke_weights`), and
# its record says so.
SMOKE = (
    "data.source=digits",
    "data.image_size=32",
    "data.train_examples=256",
    "model.num_classes=10",
    "num_epochs=2",
    "batch_size=64",
    "eval_batch_size=256",
    "schedule.warmup_epochs=0",
    "checkpoint.keep=1",
)
SMOKE_WEIGHTS_NOTE = "smoke scale: fine-tuned from a torchvision ResNet-50 of random weights, not ImageNet's"


@dataclasses.dataclass
class Job:
    """One cell in one framework, over the seeds."""

    cell: Cell
    framework: str  # 'jax' (one population over the seeds) or 'torch' (one run per seed)
    seeds: list[int]
    scale: str
    workdir: Path
    overrides: list[str]  # KEY=VALUE, given to every run as --config.KEY=VALUE
    config: object  # the config the runs receive (ml_collections.ConfigDict)
    records: Path  # where finished runs leave their records
    missing: str = ""  # why it cannot run now, and the command that fixes it
    notes: tuple = ()
    deadline: float | None = None  # time.monotonic() at which the study's budget ends

    def name(self, seed: int) -> str:
        return f"part{self.cell.part}_{self.cell.config}_seed{seed}" + (
            "_torch" if self.framework == "torch" else ""
        )

    def pending(self) -> list[int]:
        """The seeds without a record yet."""
        return [s for s in self.seeds if not (self.records / f"{self.name(s)}.json").exists()]


def data_overrides(data: str | None) -> list[str]:
    """--data as config overrides: an .npz of arrays, or a TFDS data_dir; none: each config's own."""
    if not data:
        return []
    path = Path(data).expanduser().resolve()
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--data {data}: no such file; pass the CIFAR-100 .npz or a TFDS data_dir")
        return ["data.source=npz", f"data.path={path}"]
    return ["data.source=tfds", f"data.path={path}"]


def jobs(cells, seeds, scale: str, out: Path, data: str | None, with_torch: bool) -> list[Job]:
    """What the study runs, each job with its config resolved and whatever it lacks named."""
    from cifar_jax import config as config_lib
    from cifar_jax.bench.reference import unsupported

    out_list = []
    for cell in cells:
        sets = list(SMOKE) if scale == "smoke" else data_overrides(data)
        notes = ()
        base = compare.load_config(str(ROOT / cell.config_file), sets)
        missing = ""
        if base.model.pretrained:
            if scale == "smoke":
                sets += ["head_only_epochs=1", f"model.pretrained={out / 'weights' / 'resnet50_random'}"]
                notes = (SMOKE_WEIGHTS_NOTE,)
            elif not (ROOT / base.model.pretrained).is_dir():
                weights = "IMAGENET1K_V2" if base.model.pretrained.endswith("v2") else "IMAGENET1K_V1"
                missing = (
                    f"the ImageNet weights in {base.model.pretrained}: python -m cifar_jax.convert --arch "
                    f"{base.model.name} --weights {weights} --out {base.model.pretrained}"
                )
        config = compare.load_config(str(ROOT / cell.config_file), sets)
        try:  # every cell's values checked before the first run starts, not hours later in its own
            config_lib.validate(config)
        except ValueError as e:
            raise ValueError(f"{cell.config_file} at {scale} scale: {e}") from None
        workdir, records = out / "runs" / f"part{cell.part}_{cell.config}", out / "records"
        out_list.append(
            Job(cell, "jax", seeds, scale, workdir / "jax", sets, config, records, missing, notes)
        )
        if with_torch and not unsupported(config):
            out_list.append(Job(cell, "torch", seeds, scale, workdir / "torch", sets, config, records))
    return out_list


def smoke_weights(directory: Path, log) -> None:
    """A torchvision ResNet-50 of random weights (seed 0), converted as ImageNet's would be."""
    if (directory / "done").exists():
        return
    import torch
    import torchvision

    torch.manual_seed(0)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = directory.parent / "resnet50_random.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), state)
    log(f"converting a random torchvision ResNet-50 into {directory}")
    cmd = [sys.executable, "-m", "cifar_jax.convert", "--arch", "resnet50", "--state-dict", str(state)]
    _call(cmd + ["--out", str(directory), "--overwrite"], directory.parent / "convert.log")
    state.unlink()
    (directory / "done").touch()


class BudgetSpent(Exception):
    """The study's time budget ran out during a run, which was stopped by SIGTERM (train.py saves)."""


def _call(cmd: list[str], log_file: Path, deadline: float | None = None) -> None:
    """Run `cmd` in the repository, its output appended to `log_file`; a RuntimeError with the
    log's last line if it fails, BudgetSpent if `deadline` (time.monotonic()) comes first."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # train.py saves where it is; a rerun goes on from there
            proc.wait()
            raise BudgetSpent(f"the time budget ran out during {' '.join(cmd[1:3])}") from None
    if code:
        tail = log_file.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[1:3])} ... failed: {tail[0]} (whole log: {log_file})")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _versions(framework: str) -> dict:
    return provenance.versions(
        provenance.PACKAGES + (("torch", "torchvision") if framework == "torch" else ())
    )


def _config_hash(config_json: Path) -> str:
    canonical = json.dumps(json.loads(config_json.read_text()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def record(job: Job, seed: int, run_dir: Path, report: dict, *, device: dict, train_s: float, eval_s: float):
    """The record of one finished run, its metrics and report copied beside it."""
    rows = _rows(run_dir / "metrics.jsonl")
    ema = bool(job.config.ema_decay)
    rates = [r["train_img_per_s"] for r in rows[1:] or rows if r.get("train_img_per_s")]
    return {
        "part": job.cell.part,
        "config": job.cell.config_file,
        "what": job.cell.what,
        "framework": job.framework,
        "seed": seed,
        "scale": job.scale,
        "overrides": job.overrides,
        "test_acc": report["ema_top1_acc" if ema and job.framework == "torch" else "top1_acc"],
        "val_acc": rows[-1].get("val_acc"),
        "train_acc": rows[-1].get("train_acc"),
        "checkpoint": f"last epoch ({len(rows)})" + (", weight average" if ema else ""),
        "study": job.cell.study,
        "study_where": job.cell.where,
        "config_hash": _config_hash(run_dir / "config.json"),
        "commit": device.pop("commit", None),
        "device": device,
        "versions": _versions(job.framework),
        "date": datetime.date.today().isoformat(),
        "members": len(job.seeds) if job.framework == "jax" else 1,
        "train_wall_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "epochs": len(rows),
        "img_per_s": round(statistics.median(rates), 1) if rates else None,
        "notes": list(job.notes),
    }


def save(job: Job, seed: int, rec: dict, run_dir: Path, report_file: Path) -> None:
    name, records = job.name(seed), job.records
    beside = records / name
    beside.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", beside / "metrics.jsonl")
    shutil.copyfile(report_file, beside / "report.json")
    staging.write_text(records / f"{name}.json", json.dumps(rec, indent=1) + "\n")


def run_jax(job: Job, log) -> None:
    """The cell's seeds as one population, then each member's last epoch evaluated."""
    if SMOKE_WEIGHTS_NOTE in job.notes:
        smoke_weights(Path(job.config.model.pretrained), log)
    seeds = ",".join(map(str, job.seeds))
    sets = [f"--config.{s}" for s in job.overrides] + [f"--config.population.seeds={seeds}"]
    w = job.workdir
    train = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / job.cell.config_file}", *sets]
    log(f"part {job.cell.part} {job.cell.config}: jax, seeds {seeds} as one population in {w}")
    t0 = time.perf_counter()
    _call(train + [f"--workdir={w}", "--noprogress"], w.parent / "jax.log", job.deadline)
    sessions = json.loads((w / provenance.FILE).read_text())
    train_s = sum(s.get("wall_s") or 0.0 for s in sessions) or time.perf_counter() - t0
    device = {k: sessions[-1].get(k) for k in ("commit", "backend", "device_kind", "devices", "cpu")}
    for k, seed in enumerate(job.seeds):
        if seed not in job.pending():
            continue
        member = w / f"member_{k}"
        t1 = time.perf_counter()
        ema = ["--ema"] if job.config.ema_decay else []
        evaluate = [sys.executable, str(ROOT / "eval.py"), f"--workdir={w}", f"--member={k}", *ema]
        evaluate += [f"--step={job.config.num_epochs}", f"--out={member / 'eval'}"]
        _call(evaluate, w.parent / "jax.log", job.deadline)
        report = json.loads((member / "eval" / "report.json").read_text())
        rec = record(
            job, seed, member, report, device=dict(device), train_s=train_s, eval_s=time.perf_counter() - t1
        )
        save(job, seed, rec, member, member / "eval" / "report.json")
        log(f"part {job.cell.part} {job.cell.config}: jax seed {seed}: test top-1 {rec['test_acc']:.4f}")


def run_torch(job: Job, log) -> None:
    """One PyTorch reference run per pending seed (each starts again if it was interrupted)."""
    for seed in job.pending():
        w = job.workdir / f"seed{seed}"
        if w.exists():
            shutil.rmtree(w)  # an interrupted reference run has no checkpoints to resume from
        cmd = [sys.executable, "-m", "cifar_jax.bench.reference", f"--config={ROOT / job.cell.config_file}"]
        cmd += [f"--config.{s}" for s in job.overrides] + [f"--config.seed={seed}", f"--workdir={w}"]
        log(f"part {job.cell.part} {job.cell.config}: torch, seed {seed} in {w}")
        t0 = time.perf_counter()
        _call(cmd, job.workdir / "torch.log", job.deadline)
        report = json.loads((w / "report.json").read_text())
        device = {
            "commit": provenance.commit(),
            "backend": report.get("device", "cpu"),
            "device_kind": None,
            "devices": 1,
            "cpu": provenance.cpu_model(),
        }
        rec = record(job, seed, w, report, device=device, train_s=time.perf_counter() - t0, eval_s=0.0)
        save(job, seed, rec, w, w / "report.json")
        log(f"part {job.cell.part} {job.cell.config}: torch seed {seed}: test top-1 {rec['test_acc']:.4f}")
