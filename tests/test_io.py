"""Atomic outputs and safe archive extraction, with real archive files."""
import io as stdio
import tarfile
import zipfile

import pytest

from vlbench import io


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    io.write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    d = tmp_path / "d"
    with io.atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(d) as tmp:
            (tmp / "y").write_text("2")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and [p.name for p in d.iterdir()] == ["x"]


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _tar(path, add):
    with tarfile.open(path, "w:gz") as t:
        add(t)
    return path


def _file(t, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, stdio.BytesIO(data))


def _link(t, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    t.addfile(info)


def test_good_zip_and_tar_extract(tmp_path):
    z = _zip(tmp_path / "a.zip", {"Flicker8k_Dataset/a.jpg": b"jpg", "Flickr8k_text/t.txt": b"t"})
    out = io.safe_extract(z, tmp_path / "z")
    assert (out / "Flicker8k_Dataset/a.jpg").read_bytes() == b"jpg"
    t = _tar(tmp_path / "a.tgz", lambda t: (_file(t, "imgs/b.jpg", b"b"), _link(t, "imgs/c.jpg", "b.jpg")))
    out = io.safe_extract(t, tmp_path / "t")
    assert (out / "imgs/c.jpg").read_bytes() == b"b"


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "ok/../../evil.txt"])
def test_zip_escaping_members_are_rejected(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"fine.txt": b"1", name: b"2"})
    with pytest.raises(io.UnsafeArchiveError, match="outside the target"):
        io.safe_extract(z, tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "evil.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temp folder left


@pytest.mark.parametrize("add,match", [
    (lambda t: _file(t, "../evil.txt"), "outside the target"),
    (lambda t: _link(t, "link", "/etc/passwd"), "escapes"),
    (lambda t: _link(t, "sub/link", "../../outside"), "escapes"),
    (lambda t: _link(t, "hard", "../../x", tarfile.LNKTYPE), "escapes"),
    (lambda t: _link(t, "fifo", "", tarfile.FIFOTYPE), "device or FIFO"),
])
def test_tar_escaping_members_are_rejected(tmp_path, add, match):
    t = _tar(tmp_path / "bad.tgz", lambda t: (_file(t, "fine.txt"), add(t)))
    with pytest.raises(io.UnsafeArchiveError, match=match):
        io.safe_extract(t, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    f = tmp_path / "x.zip"
    f.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a zip or tar"):
        io.safe_extract(f, tmp_path / "out")
