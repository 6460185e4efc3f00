"""``longformer_minilm``: a Longformer (sliding-window + global attention) built offline from MiniLM-L6.

No Longformer checkpoint can be downloaded here, but a Longformer layer is a BERT layer whose
self-attention only looks at ``attention_window / 2`` neighbours on each side, plus global tokens
that attend to (and are attended by) every token through projections of their own. So the
pretrained all-MiniLM-L6-v2 weights fit one to one: every layer's query/key/value (copied again
into query_global/key_global/value_global), attention output, feed-forward and LayerNorms. Only
the position table moves: Longformer numbers tokens RoBERTa-style from ``padding_idx + 1``.
With a window covering the whole text the result computes exactly MiniLM's function
(tests/test_longformer.py checks it); a smaller window makes attention sparse.
"""
from __future__ import annotations

import torch
from transformers import LongformerConfig, LongformerModel

from .components import TextEncoder, minilm_l6


class LongformerGlobalCls(LongformerModel):
    """A LongformerModel called like a BertModel, ``model(**tokenizer(texts)).last_hidden_state``,
    that gives the first token ([CLS]) global attention unless a ``global_attention_mask`` is
    passed, so CLS pooling sees the whole text however small the window."""

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, **kwargs):
        if global_attention_mask is None:
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
            global_attention_mask = torch.zeros(ref.shape, dtype=torch.long, device=ref.device)
            global_attention_mask[:, 0] = 1
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask, **kwargs
        )


def longformer_config(bert_config, tokenizer, attention_window: int, n_positions: int) -> LongformerConfig:
    """MiniLM's shape with a sliding window; room for ``n_positions`` tokens after the padding rows."""
    b = bert_config
    return LongformerConfig(
        vocab_size=b.vocab_size, hidden_size=b.hidden_size, num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads, intermediate_size=b.intermediate_size, hidden_act=b.hidden_act,
        hidden_dropout_prob=b.hidden_dropout_prob, attention_probs_dropout_prob=b.attention_probs_dropout_prob,
        type_vocab_size=b.type_vocab_size, layer_norm_eps=b.layer_norm_eps, initializer_range=b.initializer_range,
        max_position_embeddings=b.pad_token_id + 1 + n_positions, attention_window=attention_window,
        # Longformer's defaults are RoBERTa's ids; in the BERT vocabulary 0 is [PAD], 2 is [unused1].
        pad_token_id=b.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
    )


def position_table(bert_rows: torch.Tensor, padding_idx: int, n_positions: int) -> torch.Tensor:
    """BERT gives token i position row i; Longformer gives it row ``padding_idx + 1 + i`` (the rows
    up to padding_idx are never read by a real token). Past BERT's 512 rows the table repeats
    them, as the Longformer paper initialised its 4,096 positions from RoBERTa's 512."""
    table = bert_rows.new_zeros(padding_idx + 1 + n_positions, bert_rows.shape[1])
    table[padding_idx + 1 :] = bert_rows[torch.arange(n_positions) % len(bert_rows)]
    return table


def convert_state(bert_state: dict, target_keys, positions: torch.Tensor) -> dict:
    """MiniLM weights under Longformer's names (the same names, plus the *_global projections)."""
    state = {}
    for key in target_keys:
        if key == "embeddings.position_embeddings.weight":
            state[key] = positions
        else:
            # global tokens start out with the local projections: full attention, as MiniLM learnt it
            state[key] = bert_state[key.replace("_global", "")].clone()
    unused = set(bert_state) - {k.replace("_global", "") for k in state}
    if unused:
        raise RuntimeError(f"MiniLM weights with no place in the Longformer: {sorted(unused)[:3]}")
    return state


def longformer_from_minilm(attention_window: int = 16, max_text_len: int = 512) -> TextEncoder:
    """The MiniLM-L6 weights and BERT tokenizer in a Longformer with this (even) window; position
    rows for at least ``max_text_len`` tokens."""
    minilm = minilm_l6()
    bert, tokenizer = minilm.model, minilm.tokenizer
    bert_state = bert.state_dict()
    bert_rows = bert_state["embeddings.position_embeddings.weight"]
    n_positions = max(max_text_len, len(bert_rows))
    config = longformer_config(bert.config, tokenizer, attention_window, n_positions)
    model = LongformerGlobalCls(config)
    positions = position_table(bert_rows, config.pad_token_id, n_positions)
    model.load_state_dict(convert_state(bert_state, model.state_dict(), positions), strict=True)
    tokenizer.model_max_length = n_positions
    return TextEncoder(model.eval(), tokenizer, config.hidden_size)
