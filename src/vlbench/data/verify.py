"""Check a dataset's image files before any stage relies on them (the download and transfer stages)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..errors import ParamError

EXIF_ORIENTATION = 0x0112


def verify_images(records: list[dict], base: Path, max_broken_fraction: float = 0.05) -> tuple[list[dict], dict]:
    """Keep the records whose image loads; count what was dropped and what needs repair.

    Every image goes through ``runtime.load_image``, the loader the features stage uses, so an
    image kept here is one the later stages can read. Non-RGB modes and EXIF rotations are
    repaired there (counted here); missing and undecodable files are dropped and counted.
    """
    from ..runtime import load_image  # imports torch: only when there are images to check

    counts = {"missing_images": 0, "broken_images": 0, "converted_to_rgb": 0, "exif_rotated": 0}
    good = []
    for r in tqdm(records, desc="verify images", unit="img"):
        path = base / r["path"]  # an absolute record path stays as it is
        if not path.is_file():
            counts["missing_images"] += 1
            continue
        try:
            with Image.open(path) as im:  # header only: cheap
                mode, orientation = im.mode, im.getexif().get(EXIF_ORIENTATION, 1)
            load_image(str(path))
        except Exception:  # zero-byte, truncated, not an image: PIL raises several kinds
            counts["broken_images"] += 1
            continue
        counts["converted_to_rgb"] += mode != "RGB"
        counts["exif_rotated"] += orientation not in (None, 1)
        good.append(r)
    bad = counts["missing_images"] + counts["broken_images"]
    if records and bad / len(records) > max_broken_fraction:
        raise ParamError(
            f"data.max_broken_fraction: {bad} of {len(records)} images are missing or broken "
            f"({bad / len(records):.1%} > {max_broken_fraction:.1%}); repair the copy or raise the limit"
        )
    return good, counts
