"""TFDS builders of the QA datasets PRAG evaluates on, written as ArrayRecord and read without TF.

Every builder reads files the user already has from ``dl_manager.manual_dir`` (nothing is
downloaded), validates all records up front (`DataError` naming file, record and field) and writes
one ``validation`` split in file order (``disable_shuffling=True``, example key = record index).

Features are limited to what TFDS encodes with numpy alone: `Text`, `Scalar` and *one* level of
`Sequence` (of `Text` or of a dict of them). Nested ragged sequences need TensorFlow to serialize,
so PRAG's per-passage QA pairs are stored flat with a ``passage_index``.

Common features: ``id``, ``question``, ``answers`` (aliases), ``type``; the raw datasets add
``index`` (0-based record number in the source file = the PRAG ``test_id``). 2WikiMultihopQA and
HotpotQA add ``passages`` (their context paragraphs as ``"title: sentences"``) and
``supporting_titles``; PRAG adds its 3 retrieved ``passages`` with ``doc_ids``, ``rewrites`` and
``qa``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jprag.data.builders import parsers

_Text = tfds.features.Text
_TEXTS = tfds.features.Sequence(tfds.features.Text())
SPLIT = "validation"


def _common(index: bool = True) -> dict:
    out = {"id": _Text(), "question": _Text(), "answers": _TEXTS, "type": _Text()}
    if index:
        out["index"] = tfds.features.Scalar(dtype=np.int64)
    return out


class _ManualFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One source file from the manual dir → one validated ``validation`` split, in file order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SOURCE_FILE = ""
    HOMEPAGE = ""
    CITATION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own `code_path` evaluates `importlib_resources.abc.Traversable` for a
        # builder defined in a package, and that backport is only installed on Python < 3.9
        # (ModuleNotFoundError in `download_and_prepare`). Its fallback is this; TFDS uses the
        # path only to look for a `checksums.tsv` beside the code (there is none: no downloads).
        return epath.Path(inspect.getfile(cls))

    def _features(self) -> dict:
        raise NotImplementedError

    def _parse(self, manual_dir: pathlib.Path) -> list[dict]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(self._features()),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
        examples = self._parse(manual_dir)  # validate everything before anything is written
        return {SPLIT: self._generate_examples(examples)}

    def _generate_examples(self, examples):
        yield from enumerate(examples)

    def _source(self, manual_dir: pathlib.Path) -> pathlib.Path:
        path = manual_dir / self.SOURCE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return path


class TwoWikiMultihopQA(_ManualFileBuilder):
    """2WikiMultihopQA dev set (comparison, bridge_comparison, inference, compositional)."""

    name = "jprag_2wikimultihopqa"
    SOURCE_FILE = "dev.json"
    ALIASES_FILE = "id_aliases.json"
    HOMEPAGE = "https://github.com/Alab-NII/2wikimultihop"
    CITATION = ("Ho et al., Constructing A Multi-hop QA Dataset for Comprehensive Evaluation of "
                "Reasoning Steps, COLING 2020.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place 2WikiMultihopQA's `dev.json` (and optionally `id_aliases.json`, whose answer "
        "aliases are then added to `answer`) in the manual dir."
    )

    def _features(self):
        return {**_common(), "passages": _TEXTS, "supporting_titles": _TEXTS,
                "evidences": tfds.features.Sequence({"subject": _Text(), "relation": _Text(), "object": _Text()})}

    def _parse(self, manual_dir):
        aliases_path = manual_dir / self.ALIASES_FILE
        aliases = parsers.read_2wiki_aliases(aliases_path) if aliases_path.is_file() else None
        return parsers.parse_2wikimultihopqa(self._source(manual_dir), aliases)


class HotpotQA(_ManualFileBuilder):
    """HotpotQA dev set, distractor setting (bridge, comparison)."""

    name = "jprag_hotpotqa"
    SOURCE_FILE = "hotpot_dev_distractor_v1.json"
    HOMEPAGE = "https://hotpotqa.github.io/"
    CITATION = "Yang et al., HotpotQA: A Dataset for Diverse, Explainable Multi-hop Question Answering, EMNLP 2018."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place HotpotQA's `hotpot_dev_distractor_v1.json` in the manual dir."

    def _features(self):
        return {**_common(), "passages": _TEXTS, "supporting_titles": _TEXTS, "level": _Text()}

    def _parse(self, manual_dir):
        return parsers.parse_hotpotqa(self._source(manual_dir))


class PopQA(_ManualFileBuilder):
    """PopQA (entity-centric questions; the type is the Wikidata relation `prop`)."""

    name = "jprag_popqa"
    SOURCE_FILE = "popQA.tsv"
    HOMEPAGE = "https://github.com/AlexTMallen/adaptive-retrieval"
    CITATION = "Mallen et al., When Not to Trust Language Models, ACL 2023."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place PopQA's `popQA.tsv` in the manual dir."

    def _features(self):
        return {**_common(), "subj": _Text(), "obj": _Text(), "s_pop": tfds.features.Scalar(dtype=np.int64)}

    def _parse(self, manual_dir):
        return parsers.parse_popqa(self._source(manual_dir))


class ComplexWebQuestions(_ManualFileBuilder):
    """ComplexWebQuestions dev set (type = compositionality_type)."""

    name = "jprag_complexwebquestions"
    SOURCE_FILE = "ComplexWebQuestions_dev.json"
    HOMEPAGE = "https://www.tau-nlp.sites.tau.ac.il/compwebq"
    CITATION = "Talmor and Berant, The Web as a Knowledge-Base for Answering Complex Questions, NAACL 2018."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place ComplexWebQuestions' `ComplexWebQuestions_dev.json` in the manual dir."

    def _features(self):
        return _common()

    def _parse(self, manual_dir):
        return parsers.parse_complexwebquestions(self._source(manual_dir))


@dataclasses.dataclass(eq=False)
class PragConfig(tfds.core.BuilderConfig):
    """`stem`: the file's path under the PRAG data dir without suffix (``.jsonl`` or ``.json``)."""

    stem: str = ""


class PragAugmented(_ManualFileBuilder):
    """Published PRAG augmented evaluation data: each question with its 3 retrieved passages,
    their rewrites and generated QA pairs (Su et al., SIGIR 2025)."""

    name = "jprag_prag_augmented"
    HOMEPAGE = "https://github.com/oneal2000/PRAG"
    CITATION = "Su et al., Parametric Retrieval Augmented Generation, SIGIR 2025."
    BUILDER_CONFIGS = [
        PragConfig(name="hotpotqa_bridge", stem="hotpotqa/bridge"),
        PragConfig(name="2wiki_comparison", stem="2wikimultihopqa/comparison"),
        PragConfig(name="2wiki_compositional", stem="2wikimultihopqa/compositional"),
        PragConfig(name="cwq_total", stem="complexwebquestions/total"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point the manual dir at the PRAG augmented data directory, laid out as "
        "`hotpotqa/bridge.jsonl`, `2wikimultihopqa/comparison.jsonl`, "
        "`2wikimultihopqa/compositional.jsonl`, `complexwebquestions/total.jsonl` "
        "(JSON Lines, or the release's JSON arrays named `.json`)."
    )

    def _features(self):
        return {
            **_common(index=False), "test_id": _Text(), "doc_ids": _TEXTS,
            "passages": _TEXTS, "rewrites": _TEXTS,
            "qa": tfds.features.Sequence({
                "passage_index": tfds.features.Scalar(dtype=np.int32),
                "question": _Text(), "answer": _Text(), "full_answer": _Text(),
            }),
        }

    def _parse(self, manual_dir):
        stem = self.builder_config.stem
        for suffix in (".jsonl", ".json"):
            path = manual_dir / (stem + suffix)
            if path.is_file():
                return parsers.parse_prag(path)
        raise FileNotFoundError(
            f"{manual_dir / stem}.jsonl (or .json): not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")


BUILDERS: dict[str, type[_ManualFileBuilder]] = {
    "2wikimultihopqa": TwoWikiMultihopQA,
    "hotpotqa": HotpotQA,
    "popqa": PopQA,
    "complexwebquestions": ComplexWebQuestions,
    "prag_augmented": PragAugmented,
}
