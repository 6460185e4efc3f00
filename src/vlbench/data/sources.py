"""Where each real dataset comes from: the one table of download URLs.

A dataset is a list of archives; each archive unpacks into its own folder of the dataset root
so that the root ends up in the dataset's original layout (read by ``layouts``). Override a URL
from params with ``data.urls: {<archive>: <url>}`` (a mirror, or a local server in the tests).

No SHA-256 is published for these files, so ``sha256`` is None: the digest of the first
download is recorded in ``checksums.json`` of the download cache and every later download of
the same archive must match it. Put a digest here once one is known.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    file: str  # its name in the download cache (the same whatever mirror it comes from)
    url: str
    into: str = ""  # folder of the dataset root it unpacks into ("" = the root itself)
    sha256: str | None = None


KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
COCO = "http://images.cocodataset.org"

ARCHIVES = {
    # Flickr8k in its original release layout: Flicker8k_Dataset/ + Flickr8k_text/ (own split = Karpathy's)
    "flickr8k_images": Archive("Flickr8k_Dataset.zip", f"{FLICKR8K}/Flickr8k_Dataset.zip"),
    "flickr8k_text": Archive("Flickr8k_text.zip", f"{FLICKR8K}/Flickr8k_text.zip", into="Flickr8k_text"),
    # Flickr30k images; captions and split come from Karpathy's dataset_flickr30k.json
    "flickr30k_images": Archive(
        "flickr30k-images.zip", "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main/flickr30k-images.zip"
    ),
    # COCO 2014 (the year Karpathy's split is defined on): train2014/ val2014/ annotations/
    "coco2014_train": Archive("train2014.zip", f"{COCO}/zips/train2014.zip"),
    "coco2014_val": Archive("val2014.zip", f"{COCO}/zips/val2014.zip"),
    "coco2014_captions": Archive("annotations_trainval2014.zip", f"{COCO}/annotations/annotations_trainval2014.zip"),
    # dataset_{flickr8k,flickr30k,coco}.json: Karpathy's splits (and captions)
    "karpathy_splits": Archive("caption_datasets.zip", KARPATHY),
}

DATASETS = {
    "flickr8k": ["flickr8k_images", "flickr8k_text"],
    "flickr30k": ["flickr30k_images", "karpathy_splits"],
    "coco": ["coco2014_train", "coco2014_val", "coco2014_captions", "karpathy_splits"],
}
