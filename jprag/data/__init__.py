"""Data: documents (passage + rewrite + generated QA pairs) and evaluation questions.

See `jprag.data.documents` for the jprag document format and the published PRAG
augmented-data reader.
"""
