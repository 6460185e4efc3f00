"""Captioners over cached image token grids.

- ``GridTransformerCaptioner``: grid tokens -> transformer encoder -> transformer decoder over a
  word vocabulary built from the training captions (trained from scratch).
- ``VisionPrefixCaptioner``: grid tokens -> MLP -> prefix tokens + learned [SEP] -> a causal LM
  (frozen by default, ClipCap-style); loss on caption tokens only.

Both expose ``loss(tokens, captions)`` and ``generate(tokens, decoding)``.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


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
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i > UNK:
                out.append(self.itos[i])
        return " ".join(out)

    def __len__(self):
        return len(self.itos)


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


class GridTransformerCaptioner(nn.Module):
    def __init__(self, cfg, image_dim: int, n_grid: int, vocab: Vocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        d = cfg.d_model
        self.in_proj = nn.Sequential(nn.Linear(image_dim, d), nn.LayerNorm(d))
        self.grid_pos = nn.Parameter(torch.randn(1, n_grid, d) * 0.02)
        self.tok_emb = nn.Embedding(len(vocab), d, padding_idx=PAD)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.max_len, d) * 0.02)
        layer = dict(d_model=d, nhead=cfg.heads, dim_feedforward=4 * d, dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.decoder_layers)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, len(vocab), bias=False)
        self.out.weight = self.tok_emb.weight  # tied input/output embeddings
        nn.init.normal_(self.tok_emb.weight, std=0.02)  # N(0, 1) would start the tied logits far too large

    def encode(self, grid: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.in_proj(grid.float()) + self.grid_pos)

    def logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tok_emb(ids) + self.tok_pos[:, :n]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)  # True = may not attend
        h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=ids == PAD)
        return self.out(self.norm(h))

    def loss(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = _pad([self.vocab.encode(c, self.cfg.max_len) for c in captions], PAD).to(grid.device)
        logits = self.logits(self.encode(grid), ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None) -> list[str]:
        memory = self.encode(grid)
        step = lambda mem, ids: self.logits(mem, ids)[:, -1].float().log_softmax(-1)  # noqa: E731
        max_len = min(decoding.max_len, self.cfg.max_len)
        if decoding.strategy == "beam":
            ids = beam_search(step, memory, BOS, EOS, decoding.beam_size, max_len)
        else:
            ids = sample_or_greedy(step, memory, BOS, EOS, max_len, decoding, generator)
        return [self.vocab.decode(row[1:]) for row in ids]


def sample_or_greedy(step, memory, bos, eos, max_len, decoding, generator=None) -> torch.Tensor:
    """Greedy (argmax) or nucleus sampling (top-p after temperature), batched."""
    b = memory.shape[0]
    ids = torch.full((b, 1), bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    for _ in range(max_len - 1):
        logp = step(memory, ids)
        if decoding.strategy == "nucleus":
            probs = (logp / decoding.temperature).softmax(-1)
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < decoding.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            nxt = order.gather(-1, pick).squeeze(-1)
        else:
            nxt = logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == eos
        if done.all():
            break
    return ids


def beam_search(step, memory, bos, eos, beam: int, max_len: int) -> torch.Tensor:
    """Batched beam search; finished beams only extend with EOS at no cost. Returns the best beam
    per item by total log-probability (beam=1 reduces exactly to greedy)."""
    b = memory.shape[0]
    mem = memory.repeat_interleave(beam, 0)
    ids = torch.full((b * beam, 1), bos, dtype=torch.long, device=memory.device)
    scores = torch.zeros(b, beam, device=memory.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    done = torch.zeros(b * beam, dtype=torch.bool, device=memory.device)
    for _ in range(max_len - 1):
        logp = step(mem, ids)  # [b*beam, V]
        v = logp.shape[-1]
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, eos] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        total = (scores.view(-1, 1) + logp).view(b, beam * v)
        scores, flat = total.topk(beam, -1)
        src = (flat // v) + torch.arange(b, device=ids.device)[:, None] * beam
        tok = flat % v
        ids = torch.cat([ids[src.view(-1)], tok.view(-1, 1)], 1)
        done = done[src.view(-1)] | (tok.view(-1) == eos)
        if done.all():
            break
    best = scores.argmax(-1) + torch.arange(b, device=ids.device) * beam
    return ids[best]


class VisionPrefixCaptioner(nn.Module):
    def __init__(self, cfg, image_dim: int, lm):
        super().__init__()
        self.cfg = cfg
        self.lm, self.tokenizer = lm.model, lm.tokenizer
        self.lm.requires_grad_(cfg.lm_trainable)
        self.prefix = nn.Sequential(
            nn.Linear(image_dim, cfg.prefix_hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.prefix_hidden, lm.dim)
        )
        self.sep = nn.Parameter(torch.randn(1, 1, lm.dim) * 0.02)

    def prefix_embeds(self, grid: torch.Tensor) -> torch.Tensor:
        p = self.prefix(grid.float())
        return torch.cat([p, self.sep.expand(len(p), -1, -1)], 1)

    def loss(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        eos = self.tokenizer.eos_token
        batch = self.tokenizer([" " + c + eos for c in captions], padding=True, truncation=True,
                               max_length=self.cfg.max_len, return_tensors="pt", add_special_tokens=False).to(grid.device)
        prefix = self.prefix_embeds(grid)
        tok_emb = self.lm.get_input_embeddings()(batch.input_ids)
        embeds = torch.cat([prefix, tok_emb], 1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=batch.attention_mask.dtype, device=grid.device), batch.attention_mask], 1)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        labels = torch.cat([torch.full(prefix.shape[:2], -100, device=grid.device), labels], 1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None) -> list[str]:
        embeds = self.prefix_embeds(grid)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=grid.device)
        kw = dict(max_new_tokens=decoding.max_len, eos_token_id=self.tokenizer.eos_token_id,
                  pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        if decoding.strategy == "beam":
            kw.update(num_beams=decoding.beam_size, do_sample=False)
        elif decoding.strategy == "nucleus":
            kw.update(do_sample=True, top_p=decoding.top_p, temperature=decoding.temperature)
        else:
            kw.update(do_sample=False)
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.cfg.lm_trainable or not k.startswith("lm.")}
