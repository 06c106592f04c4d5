"""Each data source reads files written here in its exact on-disk format (no network)."""

import pickle
from unittest import mock

import ml_collections
import numpy as np
import pytest

from cifar_jax import data


def _random_dataset(n_train=12, n_test=5, num_classes=100, seed=0):
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    return x_tr, rng.integers(0, num_classes, n_train), x_te, rng.integers(0, num_classes, n_test)


def test_npz_round_trip(tmp_path):
    x_tr, y_tr, x_te, y_te = _random_dataset()
    names = np.array([f"class{i}" for i in range(100)])
    np.savez(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, label_names=names)
    a = data.load("npz", tmp_path / "d.npz")
    np.testing.assert_array_equal(a.x_train, x_tr)
    np.testing.assert_array_equal(a.y_test, y_te)
    assert a.y_train.dtype == np.int32 and a.label_names[7] == "class7" and a.num_classes == 100


def test_npz_missing_keys_are_named(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(data.DataError, match="lacks y_train, x_test, y_test"):
        data.load("npz", tmp_path / "d.npz")


def test_npz_wrong_dtype_is_explained(tmp_path):
    x_tr, y_tr, x_te, y_te = _random_dataset()
    np.savez(tmp_path / "d.npz", x_train=x_tr.astype(np.float32), y_train=y_tr, x_test=x_te, y_test=y_te)
    with pytest.raises(data.DataError, match=r"x_train must be uint8 images \(N, H, W, 3\), got float32"):
        data.load("npz", tmp_path / "d.npz")


def test_not_an_archive(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(data.DataError, match="not a readable .npz archive"):
        data.load("npz", tmp_path / "d.npz")


def _write_cifar_python(root, x_tr, y_tr, x_te, y_te):
    d = root / "cifar-100-python"
    d.mkdir()
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        record = {
            "filenames": [f"img_{i}.png" for i in range(len(x))],
            "batch_label": f"{name} batch",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),  # rows of R then G then B planes
        }
        (d / name).write_bytes(pickle.dumps(record, protocol=2))
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"c{i}" for i in range(20)],
    }
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


@pytest.mark.parametrize("point_at", ["parent", "dir"])
def test_cifar_python_directory(tmp_path, point_at):
    x_tr, y_tr, x_te, y_te = _random_dataset()
    d = _write_cifar_python(tmp_path, x_tr, y_tr, x_te, y_te)
    a = data.load("cifar_python", tmp_path if point_at == "parent" else d)
    np.testing.assert_array_equal(a.x_train, x_tr)
    np.testing.assert_array_equal(a.x_test, x_te)
    np.testing.assert_array_equal(a.y_train, y_tr)
    assert a.label_names[3] == "fine3"


def test_cifar_python_missing_file_and_wrong_archive(tmp_path):
    d = _write_cifar_python(tmp_path, *_random_dataset())
    (d / "test").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="test is not a CIFAR-100 python pickle"):
        data.load("cifar_python", d)
    (d / "test").unlink()
    with pytest.raises(data.DataError, match="test is missing"):
        data.load("cifar_python", d)


def test_digits_is_real_and_complete():
    a = data.load("digits")
    assert len(a.x_train) + len(a.x_test) == 1797 and a.num_classes == 10
    assert a.x_train.shape[1:] == (32, 32, 3) and a.x_train.dtype == np.uint8
    assert set(np.unique(np.concatenate([a.y_train, a.y_test]))) == set(range(10))
    assert a.x_train.max() == 255 and a.x_train.min() == 0


def test_fake_any_size():
    a = data.load("fake", num_train=10, num_test=3, num_classes=4, image_size=16)
    assert a.x_train.shape == (10, 16, 16, 3) and a.x_test.shape == (3, 16, 16, 3) and a.num_classes == 4


def test_unknown_source_lists_valid_ones():
    with pytest.raises(
        data.DataError,
        match="unknown data source 'imagenet'; valid sources: tfds, cifar_python, npz, digits, fake",
    ):
        data.load("imagenet")


@pytest.mark.parametrize("source", ["npz", "cifar_python"])
def test_missing_path_says_what_to_set(tmp_path, source):
    with pytest.raises(data.DataError, match=r"does not exist: set --config.data.path"):
        data.load(source, tmp_path / "nowhere")
    with pytest.raises(data.DataError, match=r"data.path is empty"):
        data.load(source, "")


def test_missing_extra_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kw):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(data.DataError, match=r"pip install 'cifar_jax\[digits\]'"):
        data.load("digits")


def test_missing_tfds_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
    with pytest.raises(data.DataError, match=r"pip install 'cifar_jax\[tfds\]'"):
        data.load("tfds", tmp_path)


def _write_cifar100_binary(root, x_tr, y_tr, x_te, y_te):
    """The official cifar-100-binary layout: records of [coarse, fine, 3072 bytes R/G/B planes]."""
    d = root / "cifar-100-binary"
    d.mkdir(parents=True)
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        planes = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        labels = np.stack([np.asarray(y) // 5, np.asarray(y)], axis=1).astype(np.uint8)
        np.concatenate([labels, planes], axis=1).tofile(d / f"{name}.bin")
    (d / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)) + "\n")
    (d / "coarse_label_names.txt").write_text("\n".join(f"coarse{i}" for i in range(20)) + "\n")


@pytest.mark.slow
def test_tfds_prepares_from_the_binary_archive_and_caches(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    x_tr, y_tr, x_te, y_te = _random_dataset(n_train=9, n_test=4)
    _write_cifar100_binary(tmp_path / "download", x_tr, y_tr, x_te, y_te)
    downloaded = str(tmp_path / "download")
    # The network as TFDS sees it: its download host answers (the source looks before it downloads), and the
    # download is the archive written above.
    with (
        mock.patch("socket.create_connection", return_value=mock.MagicMock()),
        mock.patch.object(
            tfds.download.DownloadManager, "download_and_extract", lambda self, url: downloaded
        ),
    ):
        a = data.load("tfds", tmp_path / "tfds")
    # TFDS keeps its own record order: match examples by content, byte for byte.
    for x_src, y_src, x_got, y_got in ((x_tr, y_tr, a.x_train, a.y_train), (x_te, y_te, a.x_test, a.y_test)):
        assert x_got.shape == x_src.shape and x_got.dtype == np.uint8
        got = {x.tobytes(): int(y) for x, y in zip(x_got, y_got)}
        assert got == {x.tobytes(): int(y) for x, y in zip(x_src, y_src)}
    assert a.label_names[5] == "fine5"
    assert (tmp_path / "tfds" / "cifar100_uint8.npz").exists()
    # The second start reads the cache: no TFDS involved at all.
    with mock.patch.dict("sys.modules", {"tensorflow_datasets": None}):
        again = data.load("tfds", tmp_path / "tfds")
    np.testing.assert_array_equal(again.x_train, a.x_train)


def _data_config(**kw):
    cfg = ml_collections.ConfigDict(
        dict(
            source="fake",
            path="",
            val_fraction=0.2,
            split_seed=0,
            train_examples=0,
            fake=dict(num_train=50, num_test=7, num_classes=5),
        )
    )
    cfg.update(kw)
    return cfg


def test_train_val_split_is_deterministic_and_disjoint():
    s1, s2 = data.load_splits(_data_config()), data.load_splits(_data_config())
    assert len(s1.train[0]) == 40 and len(s1.val[0]) == 10 and len(s1.test[0]) == 7
    np.testing.assert_array_equal(s1.val[0], s2.val[0])
    train_rows = {x.tobytes() for x in s1.train[0]}
    assert not any(x.tobytes() in train_rows for x in s1.val[0])
    other = data.load_splits(_data_config(split_seed=1))
    assert not np.array_equal(other.val[0], s1.val[0])


def test_train_examples_keeps_the_first_of_the_training_split_and_all_of_validation():
    whole = data.load_splits(_data_config())
    part = data.load_splits(_data_config(train_examples=12))
    assert len(part.train[0]) == len(part.train[1]) == 12
    np.testing.assert_array_equal(part.train[0], whole.train[0][:12])
    np.testing.assert_array_equal(part.train[1], whole.train[1][:12])
    np.testing.assert_array_equal(part.val[0], whole.val[0])
    np.testing.assert_array_equal(part.test[0], whole.test[0])


def test_bad_val_fraction():
    with pytest.raises(data.DataError, match=r"val_fraction=1.5 must be in \[0, 1\)"):
        data.load_splits(_data_config(val_fraction=1.5))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda good: b"", "No data left in file"),
        (lambda good: good[: len(good) // 2], "File is not a zip file"),
    ],
)
def test_a_zero_byte_or_truncated_npz_is_one_clear_error(tmp_path, damage, message):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "good.npz",
        x_train=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(8),
        x_test=rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(4),
    )
    (tmp_path / "d.npz").write_bytes(damage((tmp_path / "good.npz").read_bytes()))
    with pytest.raises(data.DataError, match=f"d.npz is not a readable .npz archive .*{message}"):
        data.load("npz", tmp_path / "d.npz")


def test_float_labels_are_refused_not_truncated(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(
        tmp_path / "d.npz", x_train=x, y_train=np.array([0.5, 1.0, 2.7, 3.0]), x_test=x, y_test=np.arange(4)
    )
    with pytest.raises(data.DataError, match=r"y_train holds float64 values; class labels must be integers"):
        data.load("npz", tmp_path / "d.npz")


@pytest.mark.parametrize("label,dtype", [(2**32 + 3, np.int64), (-1, np.int64), (2**63 + 3, np.uint64)])
def test_a_label_that_int32_would_wrap_is_refused_before_the_cast(tmp_path, label, dtype):
    """2**32+3 as int32 is 3, a valid class: the range is checked on the labels as stored."""
    x = np.zeros((4, 32, 32, 3), np.uint8)
    names = np.array(["a", "b", "c", "d"])
    np.savez(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.array([0, 1, label, 2], dtype),
        x_test=x,
        y_test=np.arange(4),
        label_names=names,
    )
    with pytest.raises(data.DataError, match=rf"y_train has label {label} at index 2 \(1 such label\(s\)\)"):
        data.load("npz", tmp_path / "d.npz")


def test_cifar_meta_without_fine_label_names_is_named(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    d = _write_cifar_python(tmp_path, x, np.arange(4), x, np.arange(4))
    (d / "meta").write_bytes(pickle.dumps({"label_names": ["a"]}, protocol=2))  # CIFAR-10's meta
    with pytest.raises(data.DataError, match=r"meta has no 'fine_label_names' \(it has label_names\)"):
        data.load("cifar_python", tmp_path)
