"""Evaluation: answer scoring (`metrics`: SQuAD/HotpotQA exact match, token F1, has-answer),
the PRAG inference prompts with answer extraction (`prompts`), and the answering methods
behind one interface (`methods`: vanilla, standard RAG, PRAG, PRAG-Combine, ...)."""
