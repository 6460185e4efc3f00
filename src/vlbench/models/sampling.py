"""Captions sampled with log-probabilities that carry gradients: what self-critical sequence
training (vlbench/scst.py) needs from every captioner (``sample_with_logprobs``).

Ancestral sampling from the model's full next-token distribution (temperature 1, no top-p/top-k,
so the summed log-probability is exactly that of the sampled caption under the model), batched,
on a KV cache: the grid transformer samples on its own ``CachedDecoding`` without a graph and then
scores the samples in one teacher-forced pass; the LM captioners sample on the LM's cache with
gradients, the image part (the prefix, or the start token under cross-attention) run once.
Hugging Face ``generate`` runs under ``no_grad``, hence the loop here.

The grid transformer also offers its k beams per image as candidates instead of samples
(``scst.candidates: beam``, the M2 transformer's SCST), scored the same way.

Rows are item-major: rows ``i*k .. i*k+k-1`` are the k samples of image i.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Samples:
    ids: torch.Tensor  # [R, T] sampled tokens (no start token), EOS-filled after each row's first EOS
    texts: list[str]  # R decoded captions
    logprobs: torch.Tensor  # [R] sum of log p(token) over each caption's tokens up to its EOS (with gradients)
    lengths: torch.Tensor  # [R] tokens counted in ``logprobs`` (EOS included when sampled)


def ancestral_sample(next_logp: Callable[[torch.Tensor | None], torch.Tensor], eos: int, max_new: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``next_logp(None)`` -> log-probabilities [R, V] of the first token; ``next_logp(tokens)`` feeds
    the tokens [R] just sampled and returns the next ones. Samples at most ``max_new`` tokens per
    row; finished rows get EOS at no cost. -> (ids [R, T], summed log-probs [R], lengths [R])."""
    logp = next_logp(None)
    rows = logp.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=logp.device)
    total = torch.zeros(rows, dtype=torch.float32, device=logp.device)
    lengths = torch.zeros(rows, dtype=torch.long, device=logp.device)
    picked = []
    for t in range(max_new):
        # renormalised over what may be sampled (the grid transformer never emits <pad>/<bos>): the
        # summed log-probability is exactly that of the distribution sampled from
        logp = logp.float() - logp.float().logsumexp(-1, keepdim=True)
        probs = logp.detach().exp()
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, eos), tok)
        chosen = logp.gather(1, tok[:, None]).squeeze(1)
        total = total + torch.where(done, torch.zeros_like(chosen), chosen)
        lengths = lengths + (~done).long()
        picked.append(tok)
        done = done | (tok == eos)
        if bool(done.all()) or t == max_new - 1:
            break
        logp = next_logp(tok)
    return torch.stack(picked, 1), total, lengths


def sample_on_cache(model, memory: torch.Tensor, max_len: int, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ancestral sampling on the grid transformer's KV cache over ``memory`` [R, N, D] (one row per
    caption) -> (ids, summed log-probs, lengths) as ``ancestral_sample``; the log-probabilities carry
    gradients unless called under ``no_grad``."""
    from .decoding import CachedDecoding
    from .tokenizers import BOS, EOS

    state = CachedDecoding(model, memory)
    seq = torch.full((len(memory), 1), BOS, dtype=torch.long, device=memory.device)

    def next_logp(tok):
        nonlocal seq
        if tok is not None:
            seq = torch.cat([seq, tok[:, None]], 1)
        return state.logp(seq)

    return ancestral_sample(next_logp, EOS, min(max_len, model.cfg.max_len) - 1, generator)


def sample_grid_transformer(model, grid: torch.Tensor, k: int, max_len: int,
                            generator: torch.Generator | None = None) -> Samples:
    """The grid transformer: captions sampled on its KV cache without a graph, then their
    log-probabilities by one teacher-forced pass with gradients (eval mode: the same maths as the
    cache; equal in fp32, within bf16 rounding under autocast). About 1.3x faster per SCST step than
    back-propagating through the token-by-token cache (benchmarks/scst_step.py). ``max_len``
    counts BOS and EOS, as the model's ``max_len`` does (capped by it)."""
    memory = model.encode(grid).repeat_interleave(k, 0)
    with torch.no_grad():
        ids, _, lengths = sample_on_cache(model, memory, max_len, generator)
    return _scored_grid_transformer(model, memory, ids, lengths)


def beams_grid_transformer(model, grid: torch.Tensor, k: int, max_len: int) -> Samples:
    """The grid transformer's k beams per image (beam search of width k on its KV cache, no
    trigram blocking, each image's beams best first) as candidates for SCST, with their summed
    log-probabilities by one teacher-forced pass with gradients, as ``sample_grid_transformer``.
    Deterministic: no generator."""
    from .decoding import CachedDecoding, beam_search_all
    from .tokenizers import BOS, EOS

    memory = model.encode(grid).repeat_interleave(k, 0)
    with torch.no_grad():
        ids, _ = beam_search_all(CachedDecoding(model, memory), len(grid), BOS, EOS, k, min(max_len, model.cfg.max_len))
    ids = ids[:, 1:]  # without the start token; EOS-filled after each beam's first EOS
    ended = ids == EOS
    lengths = torch.where(ended.any(1), ended.long().argmax(1) + 1, ids.shape[1])  # EOS counted when there is one
    return _scored_grid_transformer(model, memory, ids, lengths)


def _scored_grid_transformer(model, memory: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> Samples:
    """Captions ``ids`` [R, T] (no start token) of the memory rows -> Samples with their summed
    log-probabilities up to each row's length, under the distribution they are generated from
    (``generation_logp``: without <pad>, <bos>, <unk>, renormalised), by one teacher-forced pass."""
    from .tokenizers import BOS

    inputs = torch.cat([torch.full_like(ids[:, :1], BOS), ids[:, :-1]], 1)
    chosen = model.generation_logp(model.logits(memory, inputs)).gather(2, ids[:, :, None]).squeeze(2)
    counted = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]  # up to each row's EOS
    logprobs = torch.where(counted, chosen, torch.zeros_like(chosen)).sum(1)
    return Samples(ids, [model.vocab.decode(row) for row in ids.tolist()], logprobs, lengths)


def sample_after_embeds(captioner, embeds: torch.Tensor, k: int, max_len: int,
                        generator: torch.Generator | None = None) -> Samples:
    """An LM captioner: ``embeds`` [B, T, D] are the LM inputs before the caption (prefix + [SEP],
    or the start token); they run through the LM once per row, their KV cache is then repeated k
    times, and each caption is sampled token by token on the cache (``max_len`` new tokens at most,
    as ``decoding.max_len`` for generate). Call it inside whatever context the LM needs: the
    cross-attention captioner passes its start token already repeated k times, with k=1, inside
    ``attending`` (its blocks hold vision tokens for a fixed number of rows)."""
    lm, tok = captioner.lm, captioner.tokenizer
    # transformers 5 names the KV cache argument and output ``cache`` (``past_key_values`` before)
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def cache_of(out):
        got = getattr(out, "cache", None)
        return got if got is not None else out.past_key_values

    out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    past, first = cache_of(out), out.logits[:, -1]
    if k > 1:
        if hasattr(past, "batch_repeat_interleave"):
            past.batch_repeat_interleave(k)
            first = first.repeat_interleave(k, 0)
        else:  # an old-style cache: run the image part k times instead
            out = lm(inputs_embeds=embeds.repeat_interleave(k, 0), use_cache=True, logits_to_keep=1)
            past, first = cache_of(out), out.logits[:, -1]
    embed = lm.get_input_embeddings()

    def next_logp(new):
        nonlocal past
        if new is None:
            return first.float().log_softmax(-1)
        o = lm(inputs_embeds=embed(new[:, None]), use_cache=True, **{cache_arg: past})
        past = cache_of(o)
        return o.logits[:, -1].float().log_softmax(-1)

    eos = tok.eos_token_id
    ids, logprobs, lengths = ancestral_sample(next_logp, eos, max_len, generator)
    texts = []
    for row in ids.tolist():
        body = row[: row.index(eos)] if eos in row else row
        texts.append(tok.decode(body, skip_special_tokens=True).strip())
    return Samples(ids, texts, logprobs, lengths)
