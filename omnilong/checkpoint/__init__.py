"""Checkpoint I/O: Hugging Face directories (safetensors) and distributed training state."""
