"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr and, when its
Stanford CoreNLP models are present, SPICE. Each scorer runs once over the whole set
(METEOR's Java process starts once)."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path


def spice_available() -> bool:
    """SPICE needs CoreNLP jars next to it; without them it would try to download them."""
    import pycocoevalcap.spice as spice

    lib = Path(os.path.dirname(spice.__file__)) / "lib"
    return any(lib.glob("stanford-corenlp-*-models.jar")) and any(lib.glob("stanford-corenlp-*[0-9].jar"))


def caption_metrics(references: dict[str, list[str]], hypotheses: dict[str, str], spice: bool = True) -> dict:
    """``references``: id -> list of reference captions; ``hypotheses``: id -> one caption.
    ``spice=False`` skips SPICE (no key); otherwise SPICE is a score or an "unavailable (...)" string."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must cover the same ids")
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in hypotheses.items()})
    # An empty hypothesis makes METEOR's Java side hang; score it as a single unknown token instead.
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}
    out: dict[str, float | str] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress chatter
        bleu, _ = Bleu(4).compute_score(gts, res)
        for i, b in enumerate(bleu, 1):
            out[f"BLEU-{i}"] = b * 100
        out["METEOR"] = Meteor().compute_score(gts, res)[0] * 100
        out["ROUGE-L"] = Rouge().compute_score(gts, res)[0] * 100
        out["CIDEr"] = Cider().compute_score(gts, res)[0] * 100
    if not spice:
        pass  # not asked for (baselines): no SPICE key at all
    elif spice_available():
        from pycocoevalcap.spice.spice import Spice

        try:
            out["SPICE"] = Spice().compute_score(gts, res)[0] * 100
        except Exception as e:  # e.g. its Java side fails; report, do not crash the evaluation
            out["SPICE"] = f"unavailable ({type(e).__name__})"
    else:
        out["SPICE"] = "unavailable (Stanford CoreNLP models not installed)"
    return {k: float(v) if not isinstance(v, str) else v for k, v in out.items()}
