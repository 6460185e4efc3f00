"""Atomic outputs: a file or folder appears complete or not at all (temp name, fsync, rename)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def project_root() -> Path:
    """The project's home folder: where ``mlflow.db``, ``mlartifacts/``, the download cache and a
    relative ``data.root`` live. DVC sets ``DVC_ROOT`` for every stage command, to the original
    repository even when a queued experiment (``dvc exp run --queue``) runs in a temporary copy
    under ``.dvc/tmp/exps/``; outside DVC it is the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling path; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Build a folder under a temporary name; replace ``path`` with it only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder."""


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip or tar archive into ``dest``, atomically and safely.

    Rejects members with absolute paths or ``..`` that escape ``dest``, and symbolic or hard
    links (in tar) whose target escapes it; device files and FIFOs are refused. The archive is
    unpacked into a temporary sibling folder that replaces ``dest`` only once complete, so an
    interrupted extraction never looks finished.
    """
    import tarfile
    import zipfile

    archive, dest = Path(archive), Path(dest)

    def check(name: str, root: Path) -> None:
        target = (root / name).resolve()
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or not target.is_relative_to(root.resolve()):
            raise UnsafeArchiveError(f"{archive.name}: member {name!r} would be written outside the target folder")

    with atomic_dir(dest) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    check(info.filename, tmp)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise UnsafeArchiveError(f"{archive.name}: member {info.filename!r} is a symbolic link")
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = t.getmembers()
                for m in members:
                    check(m.name, tmp)
                    if m.issym() or m.islnk():
                        link_base = (tmp / m.name).parent if m.issym() else tmp
                        if m.linkname.startswith("/") or not (link_base / m.linkname).resolve().is_relative_to(tmp.resolve()):
                            raise UnsafeArchiveError(f"{archive.name}: link {m.name!r} -> {m.linkname!r} escapes the target folder")
                    elif not (m.isfile() or m.isdir()):
                        raise UnsafeArchiveError(f"{archive.name}: member {m.name!r} is a device or FIFO")
                t.extractall(tmp, members=members, filter="data")
        else:
            raise ValueError(f"{archive}: not a zip or tar archive")
    return dest
