"""Download a dataset's archives (resumable, verified) and unpack them into its root folder.

The download cache lives outside the DVC out ``data/raw`` (default ``data/downloads/``):

    archives/<file>        complete, verified archives
    archives/<file>.part   an interrupted download; the next run resumes it with an HTTP Range request
    checksums.json         {file: sha256}: recorded on the first download, checked on every later one
    <dataset>/             the unpacked dataset root; appears only once every archive is unpacked
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .. import io
from .sources import ARCHIVES, DATASETS

TIMEOUT_S = 10  # per connect and per read: an offline machine fails in seconds, not minutes
ATTEMPTS = 3  # a connection dropped mid-file is resumed this many times within one run
CHUNK = 1 << 20
HINT = "to use a copy downloaded elsewhere, set data.root in params.yaml to its folder (layouts: README, Datasets)"


class DownloadError(RuntimeError):
    """A download that cannot go on; the message is one line naming the URL."""


class _Interrupted(Exception):
    """The connection ended before the whole file arrived (the .part file is kept)."""


def _range_start(content_range: str) -> int | None:
    """The first byte of ``bytes <start>-<end>/<total>``; None when it does not parse."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _transfer(url: str, part: Path) -> None:
    """Fetch ``url`` into ``part``, continuing from the bytes already there."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "vlbench"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range is past the end: the .part cannot be trusted
            part.unlink()
            return _transfer(url, part)
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}; {HINT}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot reach {url} ({reason}); {HINT}") from None
    with resp:
        if resp.status != 206:  # the server ignored the range: start over
            have = 0
        elif have != _range_start(resp.headers.get("Content-Range", "")):
            part.unlink()  # another range than asked for: the next attempt starts over
            raise _Interrupted(f"the server resumed at another offset than {have}")
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")]
        ) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, short chunk
                    raise _Interrupted(str(e)) from None
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"got {got} of {total} bytes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, checksums: Path | None = None) -> Path:
    """``dest`` complete and verified: resumes ``dest.part``, checks or records its SHA-256.

    The expected digest is ``sha256``, else the one ``checksums`` recorded for this file name;
    with neither, the digest of this download is recorded there. A mismatch deletes the file.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(url, part)
            break
        except _Interrupted as e:
            if attempt == ATTEMPTS:
                raise DownloadError(f"download of {url} was interrupted ({e}); run again to resume from {part}") from None
    recorded = json.loads(checksums.read_text()) if checksums and checksums.is_file() else {}
    expected = sha256 or recorded.get(dest.name)
    digest = _sha256(part)
    if expected and digest != expected:
        part.unlink()
        raise DownloadError(
            f"{url}: SHA-256 {digest} does not match the expected {expected}; the download was deleted"
            + (f" (if the file changed upstream on purpose, remove its entry from {checksums})" if not sha256 else "")
        )
    if not expected and checksums:
        io.write_json(checksums, {**recorded, dest.name: digest})
    os.replace(part, dest)
    return dest


def _unpack_into(archive: Path, root: Path, into: str) -> None:
    """Unpack ``archive`` (safely) and move its top-level entries into ``root/into``."""
    staging = root / f".unpack-{archive.name}"
    target = root / into
    io.safe_extract(archive, staging)
    entries = [e for e in staging.iterdir() if e.name != "__MACOSX"]  # macOS zip clutter
    # An archive often wraps its files in a folder of the same name as the one it goes into.
    if into and len(entries) == 1 and entries[0].is_dir() and entries[0].name == Path(into).name:
        entries = list(entries[0].iterdir())
    target.mkdir(parents=True, exist_ok=True)
    for e in entries:
        if e.name != "__MACOSX":
            os.replace(e, target / e.name)
    shutil.rmtree(staging)


def fetch_dataset(name: str, cache: str | Path, urls: dict[str, str] | None = None) -> Path:
    """The dataset's root folder in ``cache``, downloaded and unpacked on first use."""
    cache = Path(cache)
    root = cache / name
    if root.is_dir():
        return root
    urls = urls or {}
    files = []
    for key in DATASETS[name]:
        a = ARCHIVES[key]
        files.append(download(urls.get(key, a.url), cache / "archives" / a.file, a.sha256, cache / "checksums.json"))
    with io.atomic_dir(root) as tmp:  # a crash mid-unpack leaves no root a later run would trust
        for key, archive in zip(DATASETS[name], files):
            _unpack_into(archive, tmp, ARCHIVES[key].into)
    return root
