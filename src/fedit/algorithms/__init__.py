"""The algorithms layer: the contract between server and clients (``contract``), the
strategies (``strategies``; a user's own by ``module:Class``), the pieces a config adds
around one (``pipeline``: robust rules, client-level DP, mixed LoRA ranks, codecs) and the
trainer hooks they share (``hooks``). numpy only: it imports no model, data, client or
runtime (docs/architecture.md)."""
