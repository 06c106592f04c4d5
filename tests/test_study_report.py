"""The study's report: RESULTS.md's tables from records, in place between markers."""

import json
import statistics
from pathlib import Path

import pytest

from cifar_jax.study import cells, report

EPYC = {"backend": "cpu", "device_kind": "cpu", "devices": 1, "cpu": "AMD EPYC"}
XEON = {"backend": "cpu", "device_kind": "cpu", "devices": 1, "cpu": "Intel Xeon"}


def _record(config="simple_cnn_tuned", framework="jax", seed=0, acc=0.5, device=EPYC, commit="a" * 40, **kw):
    cell = next(c for c in cells.CELLS if c.config == config)
    rec = {
        "part": cell.part,
        "config": cell.config_file,
        "what": cell.what,
        "framework": framework,
        "seed": seed,
        "scale": "full",
        "test_acc": acc,
        "checkpoint": "last epoch (5)",
        "study": cell.study,
        "study_where": cell.where,
        "commit": commit,
        "device": device,
        "date": "2026-12-05",
        "members": 3 if framework == "jax" else 1,
        "train_wall_s": 700.0 if framework == "jax" else 250.0,
        "eval_s": 5.0,
        "notes": [],
    }
    rec.update(kw)
    return rec


def _write_records(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        name = f"part{r['part']}_{r['config']}_seed{r['seed']}_{r['framework']}_{r['device']['cpu']}"
        (folder / f"{name.replace('/', '_')}.json").write_text(json.dumps(r))


def test_a_row_holds_mean_sd_and_each_seed_of_both_frameworks_from_one_machine():
    accs = [0.5454, 0.5508, 0.5487]
    records = [_record(seed=s, acc=a) for s, a in enumerate(accs)]
    records += [_record(framework="torch", seed=s, acc=0.55 + s / 1000) for s in range(3)]
    records.append(_record(framework="torch", seed=0, acc=0.1, device=XEON))  # another machine: its own row
    rows = report.rows(records)
    assert len(rows) == 2
    row = next(r for r in rows if r["device"] == "CPU: AMD EPYC")
    mean, sd = statistics.fmean(accs), statistics.stdev(accs)
    assert row["ours"] == f"{mean:.4f} ± {sd:.4f} (0.5454, 0.5508, 0.5487)"
    assert row["torch"].startswith("0.5510 ± 0.0010")
    other = next(r for r in rows if r["device"] == "CPU: Intel Xeon")
    assert other["ours"] == "-" and other["torch"] == "0.1000"
    assert "3 in one program" in row["wall"] and "PyTorch 250 s a seed" in row["wall"]


def test_the_study_figure_comes_from_the_cell_and_rows_follow_the_study_order():
    records = [_record(config="resnet34", acc=0.4), _record(config="simple_cnn_writeup", acc=0.05)]
    text = report.markdown(records)
    lines = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert lines[0].startswith("| 1 | `simple_cnn_writeup.py`") and "val 0.98% (Table 1" in lines[0]
    assert lines[1].startswith("| 2 | `resnet34.py`") and "56.77%" in lines[1]


def test_generated_section_replaces_only_the_text_between_markers_and_is_reproducible(tmp_path):
    records = tmp_path / "records"
    _write_records(records, [_record(seed=s, acc=0.5 + s / 100) for s in range(3)])
    results = tmp_path / "RESULTS.md"
    results.write_text(
        f"# Results\n\nprose before\n\n{report.BEGIN}\nold table\n{report.END}\n\nprose after\n"
    )
    report.write(report.load([records]), results, "cmd")
    first = results.read_text()
    assert "old table" not in first and "prose before" in first and first.endswith("prose after\n")
    assert "0.5100 ± 0.0100" in first
    report.write(report.load([tmp_path]), results, "cmd")  # a study's --out holding records/ reads the same
    assert results.read_text() == first


def test_report_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="not a directory of records"):
        report.load([tmp_path / "nowhere"])
    (tmp_path / "r").mkdir()
    with pytest.raises(ValueError, match="no records in"):
        report.load([tmp_path / "r"])
    (tmp_path / "r" / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad.json does not read .*delete it and rerun its cell"):
        report.load([tmp_path / "r"])
    (tmp_path / "r" / "bad.json").write_text(json.dumps({"part": "1"}))
    with pytest.raises(ValueError, match="lacks config, framework"):
        report.load([tmp_path / "r"])
    no_markers = tmp_path / "RESULTS.md"
    no_markers.write_text("# Results\n")
    with pytest.raises(ValueError, match="has no generated section"):
        report.write([_record()], no_markers, "cmd")
    assert no_markers.read_text() == "# Results\n"


@pytest.mark.parametrize(
    "parts,want",
    [
        ("1", ["simple_cnn", "simple_cnn_writeup"]),
        ("2,recipes", ["resnet34", "resnet18_recipe"]),
        ("recipes", ["simple_cnn_tuned", "resnet18_recipe", "resnet50_ft_recipe"]),
        ("1,2,3", ["simple_cnn", "simple_cnn_writeup", "resnet34", "resnet50_ft"]),
        ("simple_cnn,3", ["simple_cnn", "resnet50_ft"]),  # a cell by its config
        ("resnet50_ft_recipe,2", ["resnet50_ft_recipe", "resnet34"]),
    ],
)
def test_parts_select_the_study_cells(parts, want):
    got = [c.config for c in cells.selected(parts)]
    assert got == want  # in the order given


def test_unknown_part_is_refused_with_the_choices():
    for parts in ("1,4", "resnet51"):
        with pytest.raises(ValueError, match="choose from 1, 2, 3, recipes or a cell's config"):
            cells.selected(parts)


def test_results_md_tables_are_what_the_committed_records_say(tmp_path):
    """RESULTS.md's generated section, written again from results/records, is the same text."""
    root = Path(__file__).resolve().parents[1]
    results = tmp_path / "RESULTS.md"
    results.write_text((root / "RESULTS.md").read_text())
    command = "python -m cifar_jax.study report --records results/records --out RESULTS.md"
    report.write(report.load([root / "results" / "records"]), results, command)
    assert results.read_text() == (root / "RESULTS.md").read_text()
