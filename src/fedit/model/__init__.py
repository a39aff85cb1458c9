"""The model layer: tokenizer, base model and LoRA (``base``, ``lora_rank``), adapter
arrays and PEFT folders (``adapter``), GGUF conversion and aliases (``convert``), device
and dtype (``device``), and batched generation (``generate``)."""
