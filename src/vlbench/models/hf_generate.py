"""Our decoding params and seeded sampling for a Hugging Face LM's ``generate`` (the LM captioners
decode through it, with the LM's own KV cache)."""
from __future__ import annotations

import contextlib

import torch


def hf_generate_kwargs(decoding, tokenizer, use_cache: bool) -> dict:
    """Our decoding params as arguments of a Hugging Face LM's ``generate``."""
    kw = dict(max_new_tokens=decoding.max_len, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, use_cache=use_cache, do_sample=False)
    if decoding.strategy == "beam":
        kw.update(num_beams=decoding.beam_size)
    elif decoding.strategy == "nucleus":
        kw.update(do_sample=True, top_p=decoding.top_p, temperature=decoding.temperature)
    if getattr(decoding, "block_trigrams", False):  # no LM-token trigram twice in a caption
        kw.update(no_repeat_ngram_size=3)
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
