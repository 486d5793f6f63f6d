"""OmniLong: long-context fine-tuning of vision-language models in pure PyTorch."""
