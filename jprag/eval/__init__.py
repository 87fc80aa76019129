"""Evaluation: answer scoring (`jprag.eval.metrics`: SQuAD/HotpotQA exact match, token F1,
has-answer) and the PRAG inference prompts with answer extraction (`jprag.eval.prompts`)."""
