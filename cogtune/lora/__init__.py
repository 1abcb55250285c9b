"""LoRA files: the format cogtune writes and reads, below training and sampling."""
