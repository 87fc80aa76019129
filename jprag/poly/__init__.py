"""Poly-PRAG and Poly-z-PRAG: latent LoRA inventory + per-document Gumbel-sigmoid routing."""
