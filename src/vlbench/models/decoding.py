"""Batched decoding of the grid transformer: its decoder state with or without a KV cache, and the
search over it (greedy, nucleus sampling, beam search), which only needs ``state.logp(ids)`` and
``state.reorder(rows)`` and so works for any such state. The states read a GridTransformerCaptioner
(``model``; not imported here, since models/grid_transformer.py imports this module)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .multihead import merge_heads, split_heads


class FullDecoding:
    """Decoder state without a cache: every step re-runs all tokens so far."""

    def __init__(self, model, memory: torch.Tensor):
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

    def __init__(self, model, memory: torch.Tensor):
        self.model, self.device = model, memory.device
        self.layers = list(model.decoder.layers)
        self.cross = []  # per layer: (keys, values) of the memory
        for layer in self.layers:
            a = layer.multihead_attn
            _, w_k, w_v = a.in_proj_weight.chunk(3)
            _, b_k, b_v = a.in_proj_bias.chunk(3)
            self.cross.append((split_heads(F.linear(memory, w_k, b_k), a.num_heads),
                               split_heads(F.linear(memory, w_v, b_v), a.num_heads)))
        self.past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, t]; the cache holds tokens 0..t-2, so only ids[:, -1] is new."""
        m, t = self.model, ids.shape[1] - 1
        x = m.tok_emb(ids[:, -1:]) + m.tok_pos[:, t : t + 1]
        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            q, k, v = (split_heads(p, sa.num_heads) for p in F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).chunk(3, -1))
            if self.past[i] is not None:
                k, v = torch.cat([self.past[i][0], k], 2), torch.cat([self.past[i][1], v], 2)
            self.past[i] = (k, v)
            x = x + sa.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))  # causal by construction
            ca = layer.multihead_attn
            w_q, b_q = ca.in_proj_weight.chunk(3)[0], ca.in_proj_bias.chunk(3)[0]
            q = split_heads(F.linear(layer.norm2(x), w_q, b_q), ca.num_heads)
            x = x + ca.out_proj(merge_heads(F.scaled_dot_product_attention(q, *self.cross[i])))
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


def beam_search_all(state, batch: int, bos, eos, beam: int, max_len: int,
                    length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched beam search over ``state`` (rows = batch x beam, item-major; ``state.reorder(rows)``
    follows the surviving beams); finished beams only extend with EOS at no cost. Beams are ranked
    by summed log-probability / (tokens so far, EOS included) ** ``length_penalty`` (0: the plain
    sum, which favours short captions; 1: the mean per token). -> (every final beam's ids
    [batch*beam, T], item-major, each item's beams best first; their ranking scores [batch, beam])."""
    b, device = batch, state.device
    ids = torch.full((b * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(b, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    ranking = scores  # what the beams are ranked by: ``scores`` divided by length ** length_penalty
    lengths = torch.zeros(b * beam, device=device)
    done = torch.zeros(b * beam, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        logp = state.logp(ids)  # [b*beam, V]
        v = logp.shape[-1]
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, eos] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        total = scores.view(-1, 1) + logp
        grown = torch.where(done, lengths, lengths + 1)  # a finished beam keeps its length
        ranked = total if length_penalty == 0 else total / grown[:, None] ** length_penalty
        ranking, flat = ranked.view(b, beam * v).topk(beam, -1)
        scores = total.view(b, beam * v).gather(1, flat)
        src = ((flat // v) + torch.arange(b, device=device)[:, None] * beam).view(-1)
        tok = flat % v
        ids = torch.cat([ids[src], tok.view(-1, 1)], 1)
        lengths = grown[src]
        state.reorder(src)
        done = done[src] | (tok.view(-1) == eos)
        if done.all():
            break
    return ids, ranking


def beam_search(state, batch: int, bos, eos, beam: int, max_len: int, length_penalty: float = 0.0) -> torch.Tensor:
    """The best beam per item of ``beam_search_all`` (beam=1 reduces exactly to greedy) -> ids [batch, T]."""
    ids, scores = beam_search_all(state, batch, bos, eos, beam, max_len, length_penalty)
    return ids[scores.argmax(-1) + torch.arange(batch, device=ids.device) * beam]


class TrigramBlocking:
    """Wraps a decoder state: a token that would complete a trigram already in the row gets
    log-probability -inf, so no token trigram occurs twice in a caption (``decoding.block_trigrams``;
    with the ``words`` tokenizer, word trigrams). Works under greedy, nucleus and beam search."""

    def __init__(self, state):
        self.state, self.device = state, state.device

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        logp = self.state.logp(ids)
        if ids.shape[1] < 3:
            return logp
        rows, banned = [], []
        for r, seq in enumerate(ids.tolist()):
            last = tuple(seq[-2:])
            for i in range(len(seq) - 2):
                if (seq[i], seq[i + 1]) == last:
                    rows.append(r)
                    banned.append(seq[i + 2])
        if rows:
            logp = logp.index_put((torch.tensor(rows, device=logp.device), torch.tensor(banned, device=logp.device)),
                                  torch.tensor(float("-inf"), device=logp.device))
        return logp

    def reorder(self, rows: torch.Tensor) -> None:
        self.state.reorder(rows)
