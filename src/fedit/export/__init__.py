"""``fedit export``: a run's adapter merged into its base model, or as a PEFT folder
(``merge``), with a model card (``card``)."""
