"""The model layer: tokenizer, base model and LoRA (``base``, ``lora_rank``), adapter
arrays and PEFT folders (``adapter``), GGUF conversion and aliases (``convert``), device
and dtype (``device``), and the generation engine (``engine``: continuous batching, for
serving and for evaluation's ``generate``)."""
