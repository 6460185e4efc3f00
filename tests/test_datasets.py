"""Real datasets: resumable verified downloads, every supported layout, splits, and bad data.

Every fixture is built here in tmp_path (a few generated images per layout); downloads come from
a small threaded HTTP server on 127.0.0.1 that honours Range requests and can drop a connection
half-way through a file.
"""
import hashlib
import http.server
import io
import json
import socket
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import run_cli, tiny_params
from vlbench.data import fetch
from vlbench.errors import ParamError
from vlbench.validation import validate_all
from vlbench.runtime import load_image

COLOURS = [(200, 30, 30), (30, 160, 40), (30, 60, 200), (220, 200, 40), (120, 40, 160), (240, 130, 20)]


# ---------------------------------------------------------------- helpers


def jpeg_bytes(i: int = 0, size=(16, 12), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[i % len(COLOURS)]).convert(mode).save(buf, "JPEG", **save)
    return buf.getvalue()


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(i))


def zip_bytes(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def write_params(d, data: dict, split=None) -> None:
    params = tiny_params()
    params["data"] = data
    params["split"] = split or {"seed": 0, "val_size": 2, "test_size": 3}
    (d / "params.yaml").write_text(yaml.safe_dump(params))


def download_and_split(d):
    """The real CLI stages; returns (report, annotations, split counts)."""
    r = run_cli(["download", "--out", "data/raw"], cwd=d)
    assert r.returncode == 0, r.stderr
    r = run_cli(["split", "--raw", "data/raw", "--out", "data/splits"], cwd=d)
    assert r.returncode == 0, r.stderr
    raw = d / "data" / "raw"
    return (json.loads((raw / "report.json").read_text()), json.loads((raw / "annotations.json").read_text()),
            json.loads((d / "data/splits/counts.json").read_text()))


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` {url path: bytes} with Range support; paths in ``cut_once`` are cut off
    half-way the first time they are sent. ``log`` records (path, Range header, bytes sent)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files, self.cut_once, self.log = {}, set(), []
        self.ignore_range = False  # like a server without Range support: always the whole file

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        rng = None if srv.ignore_range else self.headers.get("Range")
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.cut_once:  # a dropped connection: half the promised bytes, then close
            srv.cut_once.discard(self.path)
            body = body[: len(body) // 2]
            self.close_connection = True
        srv.log.append((self.path, rng, len(body)))  # before sending: the client may finish first
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = RangeServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- downloads


def test_dropped_connection_resumes_from_the_part_file(server, tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    server.files["/a.zip"] = payload
    server.cut_once.add("/a.zip")
    dest, sums = tmp_path / "archives" / "a.zip", tmp_path / "checksums.json"
    fetch.download(server.url("/a.zip"), dest, checksums=sums)
    assert dest.read_bytes() == payload
    # the retry asked only for the missing second half
    assert server.log == [("/a.zip", None, 150_000), ("/a.zip", "bytes=150000-", 150_000)]
    assert not dest.with_name("a.zip.part").exists()
    assert json.loads(sums.read_text()) == {"a.zip": hashlib.sha256(payload).hexdigest()}


def test_part_left_by_an_interrupted_run_is_resumed_by_the_next(server, tmp_path, monkeypatch):
    payload = np.random.default_rng(1).bytes(200_001)
    server.files["/b.zip"] = payload
    server.cut_once.add("/b.zip")
    dest = tmp_path / "b.zip"
    monkeypatch.setattr(fetch, "ATTEMPTS", 1)  # this run gives up after the dropped connection
    with pytest.raises(fetch.DownloadError, match="interrupted.*run again to resume"):
        fetch.download(server.url("/b.zip"), dest)
    part = tmp_path / "b.zip.part"
    assert part.read_bytes() == payload[:100_000] and not dest.exists()
    fetch.download(server.url("/b.zip"), dest)  # the next run
    assert dest.read_bytes() == payload
    assert server.log[-1] == ("/b.zip", "bytes=100000-", 100_001)


def test_a_server_that_ignores_range_gets_the_file_from_the_start(server, tmp_path):
    payload = np.random.default_rng(2).bytes(50_000)
    server.files["/d.zip"] = payload
    server.ignore_range = True
    (tmp_path / "d.zip.part").write_bytes(b"stale bytes from another file")
    fetch.download(server.url("/d.zip"), tmp_path / "d.zip")
    assert (tmp_path / "d.zip").read_bytes() == payload  # not appended to the stale part


def test_wrong_checksum_is_rejected_and_nothing_is_left(server, tmp_path):
    server.files["/c.zip"] = b"not what was recorded" * 1000
    sums = tmp_path / "checksums.json"
    sums.write_text(json.dumps({"c.zip": "0" * 64}))
    archives = tmp_path / "archives"
    with pytest.raises(fetch.DownloadError, match="SHA-256 .* does not match the expected 0{64}"):
        fetch.download(server.url("/c.zip"), archives / "c.zip", checksums=sums)
    assert list(archives.iterdir()) == []  # neither the file nor a .part
    assert json.loads(sums.read_text()) == {"c.zip": "0" * 64}
    # a digest known in code (sources.Archive.sha256) is checked the same way
    with pytest.raises(fetch.DownloadError, match="does not match"):
        fetch.download(server.url("/c.zip"), archives / "c.zip", sha256="f" * 64)
    assert list(archives.iterdir()) == []


def test_unreachable_url_gives_one_line_naming_it(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/Flickr8k_Dataset.zip"
    write_params(tmp_path, {"name": "flickr8k", "urls": {"flickr8k_images": url}})
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vlbench download: cannot reach {url} (") and "data.root" in lines[0]
    assert not (tmp_path / "data" / "raw").exists()


def flickr8k_archives(n=12):
    names = [f"{1000 + i}_abc.jpg" for i in range(n)]
    images = zip_bytes({**{f"Flicker8k_Dataset/{x}": jpeg_bytes(i) for i, x in enumerate(names)},
                        "__MACOSX/Flicker8k_Dataset/._1000_abc.jpg": b"\0\5\x16\7"})
    token = "\n".join(f"{x}#{k}\ta photo number {i} , caption {k} ." for i, x in enumerate(names) for k in range(5))
    text = zip_bytes({"Flickr8k.token.txt": token, "Flickr_8k.trainImages.txt": "\n".join(names[:8]),
                      "Flickr_8k.devImages.txt": "\n".join(names[8:10]), "Flickr_8k.testImages.txt": "\n".join(names[10:])})
    return images, text


def test_download_stage_fetches_unpacks_and_reuses_the_cache(server, tmp_path):
    images, text = flickr8k_archives()
    server.files.update({"/img.zip": images, "/text.zip": text})
    write_params(tmp_path, {"name": "flickr8k", "root": None,
                            "urls": {"flickr8k_images": server.url("/img.zip"), "flickr8k_text": server.url("/text.zip")}})
    report, ann, counts = download_and_split(tmp_path)
    assert report["layout"] == "flickr8k" and report["split_source"] == "flickr8k_split_files"
    assert report["images"] == 12 and report["captions"] == 60 and report["broken_images"] == 0
    assert counts == {"train": 8, "val": 2, "test": 2}
    cache = tmp_path / "data" / "downloads"
    assert json.loads((cache / "checksums.json").read_text()) == {
        "Flickr8k_Dataset.zip": hashlib.sha256(images).hexdigest(), "Flickr8k_text.zip": hashlib.sha256(text).hexdigest()}
    assert sorted(p.name for p in (cache / "flickr8k").iterdir()) == ["Flicker8k_Dataset", "Flickr8k_text"]
    assert all(a["path"].startswith(str(cache / "flickr8k")) for a in ann)
    requests = len(server.log)
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)  # second run: all from the cache
    assert r.returncode == 0, r.stderr
    assert len(server.log) == requests == 2


# ---------------------------------------------------------------- local copies in each layout


def flickr30k_token(root):
    names = [f"{2000 + i}.jpg" for i in range(10)]
    write_images(root / "flickr30k_images", names)
    (root / "results_20130124.token").write_text(
        "\n".join(f"{x}#{k}\tA person number {i} doing thing {k} ." for i, x in enumerate(names) for k in range(5)))
    return {"layout": "flickr30k_token", "images": 10, "split_source": "seeded", "counts": {"train": 5, "val": 2, "test": 3}}


def flickr30k_csv(root):
    # Kaggle's copy: the images folder is nested in one of the same name, next to results.csv
    names = [f"{3000 + i}.jpg" for i in range(10)]
    write_images(root / "flickr30k_images" / "flickr30k_images", names)
    rows = [f"{x}| {k}| A dog number {i} , view {k} ." for i, x in enumerate(names) for k in range(5)]
    rows.insert(7, f"{names[1]}| 4   A dog runs across the grass .")  # the release's one broken row
    (root / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n" + "\n".join(rows))
    return {"layout": "flickr30k_csv", "images": 10, "split_source": "seeded", "bad_lines": 1,
            "counts": {"train": 5, "val": 2, "test": 3}}


def flickr30k_karpathy(root):
    names = [f"{4000 + i}.jpg" for i in range(8)]
    write_images(root / "flickr30k-images", names)
    splits = ["train", "train", "restval", "restval", "val", "val", "test", "test"]
    images = [{"filename": x, "split": s, "sentences": [{"raw": f"a scene {i} , take {k}"} for k in range(5)]}
              for i, (x, s) in enumerate(zip(names, splits))]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return {"layout": "karpathy_json", "images": 8, "split_source": "karpathy", "counts": {"train": 4, "val": 2, "test": 2}}


def coco_files(root, year: str, ids: dict):
    """``<split><year>/`` folders and caption JSONs for {split: [coco ids]}."""
    for split, image_ids in ids.items():
        fname = (lambda i: f"COCO_{split}{year}_{i:012d}.jpg") if year == "2014" else (lambda i: f"{i:012d}.jpg")
        write_images(root / f"{split}{year}", [fname(i) for i in image_ids])
        images = [{"id": i, "file_name": fname(i)} for i in image_ids]
        anns = [{"id": i * 10 + k, "image_id": i, "caption": f"a kitchen {i} with item {k}"} for i in image_ids for k in range(5)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps({"images": images, "annotations": anns}))


def coco2014_karpathy(root):
    coco_files(root, "2014", {"train": list(range(1, 9)), "val": list(range(11, 17))})
    karpathy = [{"cocoid": i, "split": "train"} for i in range(1, 9)]
    karpathy += [{"cocoid": i, "split": s} for i, s in zip(range(11, 17), ["val", "val", "test", "test", "restval", "restval"])]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
    return {"layout": "coco2014", "images": 14, "split_source": "karpathy", "counts": {"train": 10, "val": 2, "test": 2}}


def coco2017(root):
    coco_files(root, "2017", {"train": list(range(1, 11)), "val": [21, 22, 23, 24]})
    return {"layout": "coco2017", "images": 14, "split_source": "seeded", "counts": {"train": 9, "val": 2, "test": 3}}


def kaggle(root):
    names = [f"{5000 + i}_k.jpg" for i in range(10)]
    write_images(root / "Images", names)
    lines = ["image,caption"]
    for i, x in enumerate(names):
        lines += [f"{x},A child {i} , in a pink dress , climbs {k} ." for k in range(4)]
        lines.append(f'{x},"A quoted caption, number {i} ."')
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return {"layout": "kaggle", "images": 10, "split_source": "seeded", "counts": {"train": 5, "val": 2, "test": 3}}


LAYOUTS = [("flickr30k", flickr30k_token), ("flickr30k", flickr30k_csv), ("flickr30k", flickr30k_karpathy),
           ("coco", coco2014_karpathy), ("coco", coco2017), ("flickr8k", kaggle)]


@pytest.mark.parametrize("name,build", LAYOUTS, ids=[b.__name__ for _, b in LAYOUTS])
def test_layout_is_detected_and_split(tmp_path, name, build):
    root = tmp_path / "copy"
    root.mkdir()
    expected = build(root)
    write_params(tmp_path, {"name": name, "root": str(root)})
    report, ann, counts = download_and_split(tmp_path)
    assert report["layout"] == expected["layout"] and report["split_source"] == expected["split_source"]
    assert report["images"] == expected["images"] and report["captions"] == 5 * expected["images"]
    assert report["captions_per_image"] == {"5": expected["images"]} and report["images_with_few_captions"] == 0
    assert report["bad_lines"] == expected.get("bad_lines", 0)
    assert counts == expected["counts"]
    assert all(len(set(a["captions"])) == 5 for a in ann)
    test = pd.read_parquet(tmp_path / "data/splits/test.parquet")
    assert all(p.startswith(str(root)) for p in test["path"]) and all(len(c) == 5 for c in test["captions"])


def test_kaggle_captions_keep_their_commas(tmp_path):
    kaggle(tmp_path)
    from vlbench.data import layouts

    records, _ = layouts.read("flickr30k", tmp_path)
    caps = records[0]["captions"]
    assert caps[0] == "A child 0 , in a pink dress , climbs 0 ." and caps[4] == "A quoted caption, number 0 ."


def test_karpathy_split_names_coco_images_by_id_in_either_year(tmp_path):
    """Karpathy's json is defined on 2014 file names; with 2017 files the COCO id still matches."""
    coco2017(tmp_path)
    karpathy = [{"cocoid": i, "split": "train"} for i in range(1, 11)] + [
        {"cocoid": 21, "split": "val"}, {"cocoid": 22, "split": "test"}, {"cocoid": 23, "split": "restval"}]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
    from vlbench.data import layouts

    records, report = layouts.read("coco", tmp_path)
    split_of = {r["image_id"]: r["split"] for r in records}
    assert split_of["000000000021.jpg"] == "val" and split_of["000000000022.jpg"] == "test"
    assert split_of["000000000023.jpg"] == "train"  # restval
    assert "000000000024.jpg" not in split_of and report["unsplit_images"] == 1


def test_unknown_layout_names_what_was_expected(tmp_path):
    root = tmp_path / "copy"
    write_images(root / "pictures", ["a.jpg"])
    write_params(tmp_path, {"name": "coco", "root": str(root)})
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlbench download: bad params: data.root: {root} is not a coco copy")
    assert "train2014/ val2014/" in lines[0] and "annotations/captions_" in lines[0] and "captions.txt" in lines[0]


# ---------------------------------------------------------------- bad data


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bad_flickr30k(root):
    """40 good images plus one of every kind of bad file or line, in the Flickr30k token layout."""
    images = root / "flickr30k_images"
    good = [f"good_{i:02d}.jpg" for i in range(40)]
    write_images(images, good)
    full = jpeg_bytes(1, size=(64, 64))
    files = {
        "truncated.jpg": full[: len(full) // 3],
        "zero.jpg": b"",
        "gray.jpg": jpeg_bytes(2, mode="L"),
        "cmyk.jpg": jpeg_bytes(3, mode="CMYK"),
        "rgba.png": png_bytes(Image.new("RGBA", (8, 8), (255, 0, 0, 0))),
        "gray16.png": png_bytes(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = jpeg_bytes(4, size=(20, 10), exif=exif.tobytes())
    for name, data in files.items():
        (images / name).write_bytes(data)
    (images / "no_captions.jpg").write_bytes(jpeg_bytes(5))
    listed = good + list(files) + ["missing.jpg"]  # missing.jpg has captions but no file
    lines = [f"{x}#{k}\t{x} caption {k}".encode() for x in listed for k in range(5) if not (x == "good_03.jpg" and k >= 3)]
    lines += [
        b"good_00.jpg#5\t   ",  # empty caption
        b"good_01.jpg#5\tcaf\xe9 in latin-1",  # not UTF-8
        b"good_02.jpg#0\tgood_02.jpg caption 0",  # the same caption number again
        b"good_02.jpg no tab or number",  # malformed
    ]
    (root / "results_20130124.token").write_bytes(b"\n".join(lines) + b"\n")
    return len(listed)


def test_every_kind_of_bad_data_is_counted_and_the_run_stays_intact(tmp_path):
    root = tmp_path / "copy"
    listed = bad_flickr30k(root)
    write_params(tmp_path, {"name": "flickr30k", "root": str(root), "max_broken_fraction": 0.1})
    report, ann, counts = download_and_split(tmp_path)
    assert {k: report[k] for k in (
        "broken_images", "missing_images", "converted_to_rgb", "exif_rotated", "empty_captions", "non_utf8_lines",
        "duplicate_captions", "bad_lines", "images_without_captions", "images_with_few_captions")} == {
        "broken_images": 2, "missing_images": 1, "converted_to_rgb": 4, "exif_rotated": 1, "empty_captions": 1,
        "non_utf8_lines": 1, "duplicate_captions": 1, "bad_lines": 1, "images_without_captions": 1,
        "images_with_few_captions": 1}
    assert report["images"] == listed - 3 == len(ann) and report["captions_per_image"] == {"3": 1, "5": listed - 4}
    kept = {a["image_id"] for a in ann}
    assert not kept & {"truncated.jpg", "zero.jpg", "missing.jpg"}
    assert {"gray.jpg", "cmyk.jpg", "rgba.png", "gray16.png", "rotated.jpg"} <= kept
    assert sum(counts.values()) == listed - 3
    for a in ann:  # every kept image loads through the features stage's loader, repaired
        assert load_image(a["path"], 32).mode == "RGB"
    rotated = next(a for a in ann if a["image_id"] == "rotated.jpg")
    assert load_image(rotated["path"]).size == (10, 20)  # stored 20x10 landscape, shown portrait


def test_too_many_broken_images_stop_with_one_line(tmp_path):
    root = tmp_path / "copy"
    listed = bad_flickr30k(root)  # 3 of them missing or broken: above the default 5%
    write_params(tmp_path, {"name": "flickr30k", "root": str(root)})
    r = run_cli(["download", "--out", "data/raw"], cwd=tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"vlbench download: bad params: data.max_broken_fraction: 3 of {listed} images are missing or broken "
                    f"({3 / listed:.1%} > 5.0%); repair the copy or raise the limit")
    assert not (tmp_path / "data" / "raw").exists()


def test_coco_captions_for_unknown_images_and_duplicate_ids_are_counted(tmp_path):
    coco_files(tmp_path, "2017", {"train": list(range(1, 9)), "val": [21, 22]})
    ann_file = tmp_path / "annotations" / "captions_train2017.json"
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 3, "file_name": "000000000003.jpg"})  # listed twice
    data["annotations"] += [{"id": 900, "image_id": 999, "caption": "no such image"},
                            {"id": 901, "image_id": 998, "caption": "nor this one"}]
    ann_file.write_text(json.dumps(data))
    from vlbench.data import layouts

    records, report = layouts.read("coco", tmp_path)
    assert report["captions_for_unknown_images"] == 2 and report["duplicate_image_ids"] == 1
    assert len(records) == 10 and all(len(r["captions"]) == 5 for r in records)


# ---------------------------------------------------------------- load_image repairs


def test_load_image_scales_16_bit_greyscale(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)).save(p)
    assert Image.open(p).mode == "I;16"
    px = np.asarray(load_image(str(p)))
    assert px.shape == (1, 3, 3) and px[0, :, 0].tolist() == [0, 128, 255]
    assert (px == px[..., :1]).all()  # grey: equal channels


def test_load_image_applies_exif_rotation(tmp_path):
    left_red = np.zeros((16, 32, 3), np.uint8)
    left_red[:, :16] = (255, 0, 0)
    left_red[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    p = tmp_path / "r.jpg"
    Image.fromarray(left_red).save(p, quality=95, exif=exif.tobytes())
    img = load_image(str(p))
    assert img.size == (16, 32)  # portrait now
    px = np.asarray(img).astype(int)
    assert px[4, 8, 0] > 200 and px[4, 8, 2] < 60  # the left (red) half is on top
    assert px[28, 8, 2] > 200 and px[28, 8, 0] < 60


def test_load_image_puts_transparency_on_white_and_converts_cmyk(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # top: opaque red; bottom: fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    px = np.asarray(load_image(str(tmp_path / "a.png")))
    assert px[0, 0].tolist() == [255, 0, 0] and px[3, 3].tolist() == [255, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # CMYK red
    r, g, b = np.asarray(load_image(str(tmp_path / "c.jpg"))).astype(int)[4, 4]
    assert r > 230 and g < 30 and b < 30


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("data,key", [
    ({"name": "coco", "urls": {"coco_2099": "http://x/y.zip"}}, "data.urls.coco_2099"),
    ({"name": "coco", "urls": {"coco2014_val": "ftp://x/y.zip"}}, "data.urls.coco2014_val"),
    ({"name": "coco", "urls": ["http://x/y.zip"]}, "data.urls"),
    ({"name": "flickr30k", "max_broken_fraction": 1.5}, "data.max_broken_fraction"),
    ({"name": "flickr30k", "root": "/no/such/folder"}, "data.root"),
])
def test_bad_data_params_name_the_key(data, key):
    params = tiny_params()
    params["data"] = data
    with pytest.raises(ParamError) as e:
        validate_all(params)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_real_datasets_need_no_root_now_that_they_download():
    params = tiny_params()
    for name in ("flickr8k", "flickr30k", "coco"):
        params["data"] = {"name": name, "root": None, "urls": {"karpathy_splits": "https://mirror.example/c.zip"}}
        validate_all(params)
