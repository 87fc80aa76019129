"""Training: turning documents into LoRA training examples and training per-document adapters."""
