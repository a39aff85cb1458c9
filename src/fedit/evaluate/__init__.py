"""Offline evaluation: held-out loss per category, ROUGE-L, similarity and exact match
(``evaluation``, ``metrics``, ``runner``), the LLM judge (``judge`` and its client, cache
and answers), and paired comparisons with bootstrap intervals (``compare``, ``forest``)."""
