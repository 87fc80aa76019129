"""Answering methods behind one interface, so new ones (Poly-PRAG, DyPRAG, ...) plug in.

A `Method` is two independent choices:

* `passages`: paste the question's top-k passages into the prompt (standard RAG) or not;
* `adapters`: an `AdapterSource` that turns each question's top-k document ids into a
  per-row adapter `{target: (a [q, L, in, R], b [q, L, R, out])}` (PRAG: rank-concatenated
  sum of the documents' LoRAs), or None for the frozen model.

vanilla = (no passages, no adapters); standard RAG = (passages, none); PRAG = (none, bank);
PRAG-Combine = (passages, bank). Every method answers a batch of questions with one batched
`generate` call per `GenConfig.batch_size` questions, each row carrying its own adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jprag.data.documents import Document, Question
from jprag.eval.cache import AnswerCache
from jprag.eval.prompts import assistant_prefix, build_user_prompt, extract_answer
from jprag.lora.adapters import LoraConfig, merge_topk
from jprag.model.generate import SamplingConfig, generate


@dataclasses.dataclass(frozen=True)
class GenConfig:
    """How answers are generated: greedy, `max_new_tokens`, direct or chain-of-thought."""

    max_new_tokens: int = 32
    cot: bool = False
    batch_size: int = 16
    top_k: int = 3
    fewshot: tuple[tuple[str, str], ...] = ()


class AdapterSource(Protocol):
    """Per-question adapters from their retrieved documents."""

    def adapters(self, doc_ids_qk: Sequence[Sequence[str]]) -> Mapping[str, tuple[jax.Array, jax.Array]]: ...


@dataclasses.dataclass
class BankSource:
    """PRAG: a trained adapter bank; a question's adapter is the merge of its top-k rows.

    `bank` is an in-memory bank `[docs, ...]`, or a `jprag.lora.store.BankReader` (`from_dir`):
    then each question batch reads only its retrieved documents' rows from disk, so memory does
    not grow with the bank."""

    bank: Any  # Bank | BankReader
    doc_rows: Mapping[str, int]
    lora: LoraConfig
    mode: str = "sum"

    @classmethod
    def from_dir(cls, root, lora: LoraConfig | None = None, mode: str = "sum") -> "BankSource":
        from jprag.lora.store import BankReader

        reader = BankReader(root)
        return cls(reader, reader.doc_rows, lora or reader.lora, mode)

    def adapters(self, doc_ids_qk):
        missing = sorted({d for ids in doc_ids_qk for d in ids if d not in self.doc_rows})
        if missing:
            raise ValueError(f"{len(missing)} retrieved documents have no adapter in the bank (first: {missing[0]!r})")
        if hasattr(self.bank, "rows"):  # on disk: gather this batch's documents' rows
            unique = list(dict.fromkeys(d for ids in doc_ids_qk for d in ids))
            pos = {d: i for i, d in enumerate(unique)}
            bank = self.bank.rows([self.doc_rows[d] for d in unique])
            rows = jnp.asarray([[pos[d] for d in ids] for ids in doc_ids_qk], jnp.int32)
            return merge_topk(jax.tree.map(jnp.asarray, bank), rows, self.lora.scale, self.mode)
        rows = jnp.asarray([[self.doc_rows[d] for d in ids] for ids in doc_ids_qk], jnp.int32)
        return merge_topk(self.bank, rows, self.lora.scale, self.mode)

    def storage(self) -> dict[str, int]:
        """fp32 bytes of one document's adapter, none shared, and the number of documents."""
        if hasattr(self.bank, "row_bytes"):
            row = self.bank.row_bytes()
        else:
            row = sum(int(x[0].size) * x.dtype.itemsize for x in jax.tree.leaves(self.bank))
        return {"row_bytes": row, "shared_bytes": 0, "n_docs": len(self.doc_rows)}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    passages: bool
    source: str | None = None  # key of the AdapterSource in the context, e.g. "prag"


# Registry of method names → definitions; later issues register their own.
METHODS: dict[str, Method] = {
    "vanilla": Method("vanilla", passages=False),
    "rag": Method("rag", passages=True),
    "prag": Method("prag", passages=False, source="prag"),
    "prag-combine": Method("prag-combine", passages=True, source="prag"),
    # Poly-PRAG: routing over a jointly trained inventory (jprag.poly); Poly-z: new documents
    # route against an inventory trained on held-out documents. DyPRAG: translated LoRAs.
    "poly-prag": Method("poly-prag", passages=False, source="poly"),
    "poly-prag-combine": Method("poly-prag-combine", passages=True, source="poly"),
    "poly-z-prag": Method("poly-z-prag", passages=False, source="poly-z"),
    "poly-z-prag-combine": Method("poly-z-prag-combine", passages=True, source="poly-z"),
    "dyprag": Method("dyprag", passages=False, source="dyprag"),
    "dyprag-combine": Method("dyprag-combine", passages=True, source="dyprag"),
}


def register(method: Method) -> None:
    METHODS[method.name] = method


@dataclasses.dataclass
class EvalContext:
    """Everything methods read: the model, documents, retrieval results, adapter sources."""

    lm: Any  # jprag.model.chat.LoadedModel
    docs: Mapping[str, Document]
    retrieved: Mapping[str, Sequence[str]]  # question id → doc ids, best first
    gen: GenConfig = GenConfig()
    sources: dict[str, AdapterSource] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Answers:
    outputs: list[str]  # full generated continuation (after the assistant prefix)
    predictions: list[str]  # extracted short answers


def answer(method: Method, ctx: EvalContext, questions: Sequence[Question],
           progress: Callable[[int], None] | None = None, cache: AnswerCache | None = None) -> Answers:
    """Answer `questions` with `method`: batched generation, per-row adapters when it has any.

    With a `cache`, questions it already holds are not generated again, and every generated
    batch is recorded in it before the next one starts (a killed run resumes there).
    """
    if method.source is not None and method.source not in ctx.sources:
        raise ValueError(f"method {method.name!r} needs adapter source {method.source!r}, which this run did not build")
    lm, gen = ctx.lm, ctx.gen
    prefix = assistant_prefix(gen.cot)
    doc_ids = [list(ctx.retrieved[q.id])[: gen.top_k] for q in questions]
    keys = [cache.key(q.id, q.question, ids) for q, ids in zip(questions, doc_ids)] if cache is not None else None
    outputs: list[str | None] = [cache.get(k) for k in keys] if cache is not None else [None] * len(questions)
    if progress and cache is not None:
        progress(sum(o is not None for o in outputs))
    todo = [i for i, o in enumerate(outputs) if o is None]
    for start in range(0, len(todo), gen.batch_size):
        rows = todo[start : start + gen.batch_size]
        prompts = []
        for i in rows:
            passages = [ctx.docs[d].passage for d in doc_ids[i]] if method.passages else None
            user = build_user_prompt(questions[i].question, passages, cot=gen.cot, fewshot=gen.fewshot)
            prompts.append(lm.chat_tokens(user, assistant_prefix=prefix))
        adapters = ctx.sources[method.source].adapters([doc_ids[i] for i in rows]) if method.source else None
        outs = generate(
            lm.cfg, lm.params, prompts, max_new_tokens=gen.max_new_tokens, sampling=SamplingConfig(),
            stop_ids=lm.stop_ids, adapters=adapters, pad_id=int(lm.tokenizer.pad_token_id or 0),
        )
        texts = [lm.tokenizer.decode(np.asarray(o, np.int64), skip_special_tokens=True) for o in outs]
        for i, text in zip(rows, texts):
            outputs[i] = text
        if cache is not None:
            cache.add((keys[i], text) for i, text in zip(rows, texts))
        if progress:
            progress(len(rows))
    predictions = [extract_answer(o, gen.cot) for o in outputs]
    return Answers(outputs, predictions)
