"""wandb as a real component: a short run in wandb's offline mode, read back from the run files
wandb writes (their records parsed with wandb's own protobuf definitions): the history equals
metrics.jsonl, the config is the run's, and a resumed run continues the same wandb run id."""

import json

import pytest

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from cifar_jax import trainer  # noqa: E402
from tests.support.helpers import tiny_config  # noqa: E402

BLOCK = 32 * 1024  # wandb's run files are LevelDB-style logs: 32 KiB blocks of framed records


def _records(path) -> list:
    """The protobuf Records of a `run-ID.wandb` file: a 7-byte header (":W&B", magic, version),
    then chunks of [crc32 4 bytes, length 2 bytes, type 1 byte: full/first/middle/last] that never
    cross a block boundary."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the block's zero padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _run_file(workdir, index):
    runs = sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    return runs[index]


def _history(records) -> list[dict]:
    def key(item):
        return item.key or "/".join(item.nested_key)

    return [
        {key(item): json.loads(item.value_json) for item in r.history.item if not key(item).startswith("_")}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def _run_id(records) -> str:
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run.run_id


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports sent anywhere


@pytest.mark.slow
def test_an_offline_run_reads_back_as_metrics_jsonl_and_a_resume_continues_it(tmp_path, offline_wandb):
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(
        tiny_config(num_epochs=2, **{"wandb.mode": "offline"}), workdir, progress=False
    )
    first = _records(_run_file(workdir, 0))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert _history(first) == [{k: v for k, v in row.items() if v is not None} for row in rows]
    (config,) = [r.config for r in first if r.WhichOneof("record_type") == "config"] or [
        r.run.config for r in first if r.WhichOneof("record_type") == "run"
    ]
    saved = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in config.update}
    assert (
        saved["model"]["name"] == "simple_cnn"
        and saved["num_epochs"] == 2
        and saved["wandb"]["mode"] == "offline"
    )

    trainer.train_and_evaluate(
        tiny_config(num_epochs=3, **{"wandb.mode": "offline"}), workdir, progress=False
    )
    second = _records(_run_file(workdir, 1))
    assert _run_id(second) == _run_id(first) == (workdir / "wandb_id.txt").read_text().strip()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert _history(second) == [{k: v for k, v in rows[2].items() if v is not None}]  # the resumed epoch only


@pytest.mark.slow
def test_each_member_of_a_population_is_its_own_wandb_run_in_one_group(tmp_path, offline_wandb):
    workdir = tmp_path / "sweep"
    config = tiny_config(num_epochs=1, **{"wandb.mode": "offline", "population.seeds": "0,1"})
    trainer.train_and_evaluate(config, workdir, progress=False)
    ids = set()
    for k in range(2):
        member = workdir / f"member_{k}"
        records = _records(_run_file(member, 0))
        rows = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
        assert _history(records) == [{key: v for key, v in row.items() if v is not None} for row in rows]
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.display_name) == ("sweep", f"sweep/member_{k}")
        ids.add(run.run_id)
    assert len(ids) == 2
