"""The client layer: one client's round (``round``), the trainer (``trainer``) and what it
trains on (``objective``, ``losses``), the fused CPU kernels (``fused``), personal adapters
(``personalize``) and loading the model a run trains (``load``)."""
