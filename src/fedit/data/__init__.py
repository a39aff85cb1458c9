"""Data: loading and validation, held-out split, client partitions, prompts, batching."""
