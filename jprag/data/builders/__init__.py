"""TFDS builders for the QA datasets PRAG evaluates on, and plain-Python loaders over them.

Builders (TFDS ``name``; source file(s) in the manual dir — nothing is ever downloaded):

* `TwoWikiMultihopQA` (``jprag_2wikimultihopqa``): 2WikiMultihopQA ``dev.json`` (+ optional
  ``id_aliases.json``);
* `HotpotQA` (``jprag_hotpotqa``): ``hotpot_dev_distractor_v1.json``;
* `PopQA` (``jprag_popqa``): ``popQA.tsv``;
* `ComplexWebQuestions` (``jprag_complexwebquestions``): ``ComplexWebQuestions_dev.json``;
* `PragAugmented` (``jprag_prag_augmented``), configs ``hotpotqa_bridge``, ``2wiki_comparison``,
  ``2wiki_compositional``, ``cwq_total``: the published PRAG augmented files
  (``hotpotqa/bridge.jsonl``, ...), parsed with `jprag.data.documents.read_prag_file`.

Each writes one ``validation`` split as ArrayRecord, in source order, and is read back with
``builder.as_data_source`` — no TensorFlow needed for either. Without TFDS knowledge::

    qs = load_questions("hotpotqa", data_dir, manual_dir, first_n_per_type=300)
    docs = passages_as_documents("prag_augmented/hotpotqa_bridge", data_dir, "shared/data")

`prepare` builds once (reused afterwards; ``force=True`` rebuilds), `load_examples` gives every
feature as plain Python, `select` is the type filter / per-type head.
"""

from jprag.data.builders.api import (
    dataset_names,
    get_builder,
    load_examples,
    load_questions,
    passages_as_documents,
    prepare,
    select,
)
from jprag.data.builders.tfds_builders import (
    BUILDERS,
    SPLIT,
    ComplexWebQuestions,
    HotpotQA,
    PopQA,
    PragAugmented,
    PragConfig,
    TwoWikiMultihopQA,
)

__all__ = [
    "BUILDERS", "SPLIT", "ComplexWebQuestions", "HotpotQA", "PopQA", "PragAugmented", "PragConfig",
    "TwoWikiMultihopQA", "dataset_names", "get_builder", "load_examples", "load_questions",
    "passages_as_documents", "prepare", "select",
]
