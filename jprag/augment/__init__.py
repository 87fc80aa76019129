"""Augmentation: turn passages into `Document`s (a rewrite plus generated QA pairs).

Uses the reference PRAG prompts (github.com/oneal2000/PRAG ``src/augment.py``), batched
generation, lenient JSON parsing of the QA output and a resumable on-disk cache. See
`jprag.augment.augment`.
"""

from jprag.augment.augment import (
    CACHE_FILE,
    META_FILE,
    QA_PROMPT,
    REWRITE_PROMPT,
    AugmentCacheError,
    AugmentConfig,
    GenerateFn,
    augment_documents,
    chat_generate_fn,
    parse_qa_json,
    qa_prompt,
    rewrite_prompt,
)

__all__ = [
    "CACHE_FILE",
    "META_FILE",
    "QA_PROMPT",
    "REWRITE_PROMPT",
    "AugmentCacheError",
    "AugmentConfig",
    "GenerateFn",
    "augment_documents",
    "chat_generate_fn",
    "parse_qa_json",
    "qa_prompt",
    "rewrite_prompt",
]
