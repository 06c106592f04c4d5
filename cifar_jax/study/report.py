"""RESULTS.md's tables written from the study's records (`runs.record`), never by hand.

One row per cell and per (device, commit): ours and the PyTorch reference's test accuracy (mean
+- sample sd over the seeds, and each seed) from the same machine and commit, both evaluated on
their last epoch, beside the study's own figure. The tables go between two marker lines of an
existing file, whose other text stays as it is; the same records always give the same text.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cifar_jax import staging
from cifar_jax.errors import one_line
from cifar_jax.study.cells import CELLS

BEGIN = (
    "<!-- study report: begin; written by `python -m cifar_jax.study report`, edit outside these markers -->"
)
END = "<!-- study report: end -->"
KEYS = ("part", "config", "framework", "seed", "scale", "test_acc", "checkpoint", "commit", "device", "date")


def load(paths) -> list[dict]:
    """Every record in `paths` (records directories, or a study's --out holding records/); a
    ValueError naming the file that does not read."""
    out = []
    for p in map(Path, paths):
        folder = p / "records" if (p / "records").is_dir() else p
        if not folder.is_dir():
            raise ValueError(f"--records {p}: not a directory of records (a study's --out, or its records/)")
        for f in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(
                    f"record {f} does not read ({one_line(e, 120)}); delete it and rerun its cell"
                )
            lacking = [k for k in KEYS if k not in rec]
            if lacking:
                raise ValueError(f"record {f} lacks {', '.join(lacking)}; delete it and rerun its cell")
            out.append(rec)
    if not out:
        raise ValueError(f"no records in {', '.join(map(str, paths))}; run `python -m cifar_jax.study` first")
    return out


def device_label(rec: dict) -> str:
    d = rec["device"]
    if d.get("backend", "cpu") == "cpu":
        return f"CPU: {d.get('cpu')}"
    return f"{d.get('device_kind')} x{d.get('devices', 1)}"


def _accuracy(records: list[dict]) -> str:
    if not records:
        return "-"
    values = [r["test_acc"] for r in sorted(records, key=lambda r: r["seed"])]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    each = ", ".join(f"{v:.4f}" for v in values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f} ({each})"


def _wall(jax_runs: list[dict], torch_runs: list[dict]) -> str:
    parts = []
    if jax_runs:
        r = jax_runs[0]
        together = f", {r['members']} in one program" if r["members"] > 1 else ""
        parts.append(f"ours {r['train_wall_s']:.0f} s{together}")
    if torch_runs:
        parts.append(f"PyTorch {statistics.fmean(r['train_wall_s'] for r in torch_runs):.0f} s a seed")
    return "; ".join(parts)


def _span(dates: list[str]) -> str:
    return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def rows(records: list[dict]) -> list[dict]:
    """The table's rows: records grouped by cell, scale, device and commit, in the study's order."""
    order = {c.config_file: i for i, c in enumerate(CELLS)}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (
            order.get(r["config"], len(order)),
            r["config"],
            r["scale"],
            device_label(r),
            r["commit"] or "?",
        )
        groups.setdefault(key, []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "full", k[2], k[3], k[4])):
        runs = groups[key]
        ours = [r for r in runs if r["framework"] == "jax"]
        ref = [r for r in runs if r["framework"] == "torch"]
        first = runs[0]
        out.append(
            {
                "part": first["part"],
                "config": first["config"],
                "what": first.get("what", ""),
                "scale": first["scale"],
                "study": first.get("study", "-"),
                "study_where": first.get("study_where", ""),
                "ours": _accuracy(ours),
                "torch": _accuracy(ref),
                "seeds": ", ".join(str(s) for s in sorted({r["seed"] for r in runs})),
                "checkpoint": first["checkpoint"],
                "device": key[3],
                "commit": key[4][:7] + ("+dirty" if key[4].endswith("+dirty") else ""),
                "dates": _span(sorted({r["date"] for r in runs})),
                "wall": _wall(ours, ref),
                "notes": sorted({n for r in runs for n in r.get("notes", [])}),
            }
        )
    return out


def markdown(records: list[dict]) -> str:
    """The generated section (without the markers)."""
    lines = [
        "| part | config | the study | ours: test top-1 | PyTorch reference: test top-1 | seeds | "
        "checkpoint | device | commit | date | train wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for row in rows(records):
        config = f"`{Path(row['config']).name}`: {row['what']}"
        if row["scale"] != "full":
            config += f" (**{row['scale']} scale**)"
        for note in row["notes"]:
            notes.append(note)
            config += f" [{len(notes)}]"
        study = row["study"] if row["study"] == "-" else f"{row['study']} ({row['study_where']})"
        lines.append(
            f"| {row['part']} | {config} | {study} | {row['ours']} | {row['torch']} | {row['seeds']} | "
            f"{row['checkpoint']} | {row['device']} | {row['commit']} | {row['dates']} | {row['wall']} |"
        )
    lines += ["", *[f"[{i}] {n}" for i, n in enumerate(notes, 1)]] if notes else []
    return "\n".join(lines) + "\n"


def write(records: list[dict], out: Path, command: str) -> None:
    """Put the generated section between the markers of `out` (a new file: just the section)."""
    section = f"{BEGIN}\n\nWritten by `{command}` from {len(records)} records.\n\n{markdown(records)}\n{END}"
    if not out.exists():
        staging.write_text(out, f"# Results\n\n{section}\n")
        return
    text = out.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(
            f"{out} has no generated section: put the line {BEGIN!r} and, below it, {END!r} where the "
            "tables go"
        )
    head, rest = text.split(BEGIN)
    staging.write_text(out, head + section + rest.split(END, 1)[1])
