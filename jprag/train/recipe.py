"""The PRAG training recipe: which samples a document yields, their text, tokens and loss mask.

Reference: github.com/oneal2000/PRAG at commit 77c6ed8f, ``src/encode.py`` (`get_train_data`,
`TrainingData`, `train`) and ``src/prompt_template.py`` (`get_prompt`, `_get_prompt`, the
prompt strings). What it does, per document (one passage with its augmentation):

* Samples. With ``n`` generated QA pairs and ``k = (n + 1) // 2``, QA pair i < k gives two
  samples, one with the original passage and one with the rewrite as the knowledge, and each
  remaining QA pair gives one sample with no knowledge at all. For the published ``n = 3``:
  QA1+passage, QA1+rewrite, QA2+passage, QA2+rewrite, QA3 alone (5 samples), in that order,
  never shuffled (``shuffle=False``, batch size 1). Fewer QA pairs give fewer samples by the
  same rule: n=2 -> 3 samples (QA1+passage, QA1+rewrite, QA2), n=1 -> 2, n=0 -> none.
* Text. The question is stripped and gets a ``?`` if it lacks one (``" ?"`` becomes ``"?"``);
  the answer (``answer``, or ``full_answer`` with CoT) is stripped and gets a ``.`` if it lacks
  one. Knowledge is ``"Passage 1: {text}\\n"`` (empty without knowledge). The user turn is
  `USER_PROMPT` (direct) or `USER_PROMPT_WITH_COT` (CoT, with the dataset's few-shot examples,
  each ``"Question: {q}\\nAnswer: {a}\\n\\n"``); the assistant turn is ``"The answer is {answer}"``
  (direct) or ``"Answer: {full_answer}"`` (CoT).
* Tokens. ``apply_chat_template([user], add_generation_prompt=True)`` followed by
  ``tokenizer.encode(assistant, add_special_tokens=False)``: the assistant turn is *not*
  closed, there is no end-of-turn token. Sequences longer than 3000 tokens are cut on the right.
* Loss. ``labels = input_ids`` with -100 only on padding: the HF causal-LM loss over every
  token of the sequence (system prompt, user turn and answer), i.e. every position but the
  first is a next-token target. Mean over targets, one sample per optimiser step.
* Training: LoRA on ``gate_proj/up_proj/down_proj``, dropout 0, AdamW, lr 3e-4, rank 2,
  alpha 32, 1 epoch in the released configs (``configs/*_llama3.2-1b-instruct.sh``), every
  document's adapter starting from the same saved random init.

Choices made here:

* `RecipeConfig.close_turn` (default True) renders the full conversation with
  ``add_generation_prompt=False`` and keeps the sequence up to and including the assistant's
  end-of-turn token (any whitespace the template adds after it is dropped), so the adapter also
  learns to stop. ``close_turn=False`` reproduces the reference tokens exactly (generation
  prompt + encoded answer, no end-of-turn token).
* Loss-mask convention: ``loss_mask[t] = 1`` means "token t is a prediction target", i.e. the
  logits at position t-1 are scored against ``tokens[t]``. A trainer uses ``logits[:, :-1]``,
  ``tokens[:, 1:]`` and ``loss_mask[:, 1:]``. Position 0 is never a target, so its mask is 0;
  the default mask is 1 everywhere else (the reference behaviour). ``answer_only_loss=True``
  marks only the assistant answer tokens (and the end-of-turn token with ``close_turn``).
  The answer span is found by rendering the user turn alone with ``add_generation_prompt=True``
  and checking it is a token prefix of the full conversation (`RecipeError` if not).
* Length: `encode_example` raises `SequenceTooLong` (a `RecipeError`) above ``max_len``.
  `document_examples` instead shortens the knowledge text (passage or rewrite) from its end, by
  whole tokens, until the sample fits, and records the number of knowledge tokens dropped in
  `Example.truncated`; question and answer are never cut. (With the SmolLM2 tokenizer and
  ``max_len=512`` this touches a few of the longest rewrites in the published data.)
* CoT few-shot: the reference reads ``src/fewshot/<dataset>.json``; here the few-shot text is
  `RecipeConfig.fewshot` (build it with `format_fewshot`), empty by default.
* Tokenizers without a chat template: plain user text (as `jprag.model.chat` prompts base
  models), then ``" " + answer`` and, with ``close_turn``, the EOS token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from jprag.data.documents import Document

USER_PROMPT = (
    "You should answer the question by referring to the knowledge provided below and "
    "integrating your own knowledge.\n{passages}\n\nQuestion: {question}"
)
USER_PROMPT_WITH_COT = (
    "You should reference the knowledge provided below and combine it with your own knowledge "
    "to answer the question. Please follow the format of the example I provided above.\n"
    "Here are some examples about how to answer the questions.\n{fewshot}"
    "Here are some reference.\n{passages}\n\n"
    "Let's think step by step. Answer the questions in the same format as above.\n"
    "Question: {question}"
)
ASSISTANT_PROMPT = "The answer is {answer}"
ASSISTANT_PROMPT_WITH_COT = "Answer: {answer}"

_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


class RecipeError(ValueError):
    """A training sample cannot be built (template mismatch, too long, bad config)."""


class SequenceTooLong(RecipeError):
    def __init__(self, length: int, max_len: int):
        super().__init__(f"training sample has {length} tokens, more than max_len={max_len}")
        self.length = length
        self.max_len = max_len


@dataclass(frozen=True)
class RecipeConfig:
    cot: bool = False
    answer_only_loss: bool = False
    max_len: int = 512
    close_turn: bool = True  # False: the reference's exact tokens (no end-of-turn token)
    fewshot: str = ""  # CoT only: few-shot block, see `format_fewshot`


@dataclass(frozen=True, eq=False)
class Example:
    tokens: np.ndarray  # int32 [S]
    loss_mask: np.ndarray  # int32 [S]; 1 = token t is a prediction target (see module doc)
    prompt_len: int = 0  # tokens before the assistant answer
    truncated: int = 0  # knowledge tokens dropped to fit max_len


# ----------------------------------------------------------------------------- text


def normalize_question(question: str) -> str:
    """The reference's question clean-up: strip, end with ``?`` (``" ?"`` -> ``"?"``)."""
    question = question.strip()
    if not question.endswith("?"):
        question = question + "?"
    elif question.endswith(" ?"):
        question = question[:-1].strip() + "?"
    return question


def normalize_answer_text(answer: str) -> str:
    """The reference's answer clean-up: strip, end with ``.``."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def format_fewshot(examples: Sequence[tuple[str, str]]) -> str:
    """Few-shot block of the CoT prompt, as the reference builds it from ``(question, answer)``."""
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)


def user_prompt(question: str, passages: Sequence[str] | None = None, *, cot: bool = False,
                fewshot: str = "") -> str:
    """The user turn: instruction, numbered passages (if any) and the question."""
    contexts = "".join(f"Passage {i + 1}: {p}\n" for i, p in enumerate(passages or ()))
    question = normalize_question(question)
    if cot:
        return USER_PROMPT_WITH_COT.format(question=question, passages=contexts, fewshot=fewshot)
    return USER_PROMPT.format(question=question, passages=contexts)


def assistant_text(answer: str | None = None, *, cot: bool = False) -> str:
    """The assistant turn; with `answer` None the reference's inference prefix
    (``"The answer is "`` / ``"Answer: "``)."""
    answer = "" if answer is None else normalize_answer_text(answer)
    return (ASSISTANT_PROMPT_WITH_COT if cot else ASSISTANT_PROMPT).format(answer=answer)


def _samples(doc: Document) -> list[tuple[int, str | None]]:
    """`(qa index, knowledge text or None)` in the reference's order."""
    with_knowledge = (len(doc.qa) + 1) // 2
    out: list[tuple[int, str | None]] = []
    for i in range(len(doc.qa)):
        if i < with_knowledge:
            out += [(i, doc.passage), (i, doc.rewrite)]
        else:
            out.append((i, None))
    return out


def _sample_text(doc: Document, i: int, knowledge: str | None, cot: bool, fewshot: str
                 ) -> tuple[list[dict], str]:
    qa = doc.qa[i]
    messages = [{"role": "user", "content": user_prompt(
        qa.question, None if knowledge is None else [knowledge], cot=cot, fewshot=fewshot)}]
    return messages, assistant_text(qa.full_answer if cot else qa.answer, cot=cot)


def training_texts(doc: Document, cot: bool = False, fewshot: str = "") -> list[tuple[list[dict], str]]:
    """The reference's training samples of one document as ``(messages, assistant text)``:
    QA1+passage, QA1+rewrite, QA2+passage, QA2+rewrite, QA3 alone for three QA pairs (see the
    module docstring for other counts)."""
    return [_sample_text(doc, i, k, cot, fewshot) for i, k in _samples(doc)]


# ----------------------------------------------------------------------------- tokens


def _ids(x: Any) -> list[int]:
    if isinstance(x, Mapping) or hasattr(x, "input_ids"):
        x = x["input_ids"]
    return [int(i) for i in x]


def end_of_turn_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS and known end-of-turn token ids."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in _END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != unk:
            ids.add(tid)
    return ids


def _tokenize(tokenizer, messages: list[dict], answer: str, close_turn: bool) -> tuple[list[int], int]:
    """`(tokens, prompt_len)`: tokens[prompt_len:] is the assistant answer (and end of turn)."""
    if not getattr(tokenizer, "chat_template", None):
        prompt = _ids(tokenizer("\n\n".join(m["content"] for m in messages)))
        ans = _ids(tokenizer(" " + answer, add_special_tokens=False))
        if close_turn and tokenizer.eos_token_id is not None:
            ans.append(int(tokenizer.eos_token_id))
        return prompt + ans, len(prompt)
    prompt = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if not close_turn:  # the reference: generation prompt + encoded answer
        return prompt + _ids(tokenizer(answer, add_special_tokens=False)), len(prompt)
    full = _ids(tokenizer.apply_chat_template(
        list(messages) + [{"role": "assistant", "content": answer}],
        add_generation_prompt=False, tokenize=True))
    if full[: len(prompt)] != prompt:
        raise RecipeError(
            "the chat template's generation prompt is not a token prefix of the full conversation; "
            "cannot locate the assistant answer (use close_turn=False)"
        )
    eot = end_of_turn_ids(tokenizer)
    ends = [t for t in range(len(prompt), len(full)) if full[t] in eot]
    if ends:
        full = full[: ends[-1] + 1]
    return full, len(prompt)


def encode_example(tokenizer, messages: list[dict], answer: str, cfg: RecipeConfig = RecipeConfig()) -> Example:
    """Tokenize one ``(messages, assistant text)`` sample and build its loss mask.

    Raises `SequenceTooLong` when it exceeds ``cfg.max_len`` (see `document_examples`)."""
    tokens, prompt_len = _tokenize(tokenizer, messages, answer, cfg.close_turn)
    if len(tokens) > cfg.max_len:
        raise SequenceTooLong(len(tokens), cfg.max_len)
    mask = np.zeros(len(tokens), np.int32)
    mask[prompt_len if cfg.answer_only_loss else 1:] = 1
    return Example(np.asarray(tokens, np.int32), mask, prompt_len)


def _fit(tokenizer, doc: Document, i: int, knowledge: str | None, cfg: RecipeConfig) -> Example:
    try:
        return encode_example(tokenizer, *_sample_text(doc, i, knowledge, cfg.cot, cfg.fewshot), cfg)
    except SequenceTooLong as err:
        if knowledge is None:
            raise RecipeError(f"document {doc.id} QA {i + 1}: {err} (no knowledge to shorten)") from None
        over = err.length - cfg.max_len
    k_ids = _ids(tokenizer(knowledge, add_special_tokens=False))
    keep = len(k_ids) - over
    while keep > 0:
        text = tokenizer.decode(k_ids[:keep]).rstrip("\ufffd")
        try:
            ex = encode_example(tokenizer, *_sample_text(doc, i, text, cfg.cot, cfg.fewshot), cfg)
            return dataclasses.replace(ex, truncated=len(k_ids) - keep)
        except SequenceTooLong as err:
            keep -= max(1, err.length - cfg.max_len)
    raise RecipeError(
        f"document {doc.id} QA {i + 1}: does not fit max_len={cfg.max_len} even without its knowledge text"
    )


def document_examples(tokenizer, doc: Document, cfg: RecipeConfig = RecipeConfig()) -> list[Example]:
    """The document's training examples in the reference order (knowledge shortened to fit)."""
    return [_fit(tokenizer, doc, i, k, cfg) for i, k in _samples(doc)]


def corpus_examples(tokenizer, docs: Sequence[Document], cfg: RecipeConfig = RecipeConfig()) -> list[list[Example]]:
    return [document_examples(tokenizer, d, cfg) for d in docs]


# ----------------------------------------------------------------------------- batching


def pack_step_batches(per_doc_examples: Sequence[Sequence[Example]], pad_id: int,
                      multiple: int = 32) -> list[dict[str, np.ndarray]]:
    """One batch per training step, a row per document: step t holds each document's t-th example.

    Each dict has ``tokens``, ``attn_mask`` (1 = real token; right padding), ``loss_mask``
    (``[D, S_t]``), ``active`` (``[D]``, 0 when the document has no t-th example: its row is all
    padding with zero masks) and ``lengths`` (``[D]``), all int32. ``S_t`` is the longest
    example of step t rounded up to `multiple`, so few distinct shapes get compiled.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    n_docs = len(per_doc_examples)
    n_steps = max((len(e) for e in per_doc_examples), default=0)
    batches = []
    for t in range(n_steps):
        rows = [ex[t] if t < len(ex) else None for ex in per_doc_examples]
        longest = max(len(r.tokens) for r in rows if r is not None)
        seq = -(-max(longest, 1) // multiple) * multiple
        tokens = np.full((n_docs, seq), pad_id, np.int32)
        attn = np.zeros((n_docs, seq), np.int32)
        loss = np.zeros((n_docs, seq), np.int32)
        active = np.zeros(n_docs, np.int32)
        lengths = np.zeros(n_docs, np.int32)
        for d, r in enumerate(rows):
            if r is None:
                continue
            n = len(r.tokens)
            tokens[d, :n] = r.tokens
            attn[d, :n] = 1
            loss[d, :n] = r.loss_mask
            active[d] = 1
            lengths[d] = n
        batches.append({"tokens": tokens, "attn_mask": attn, "loss_mask": loss,
                        "active": active, "lengths": lengths})
    return batches


def padding_fraction(batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Share of token slots holding padding (inactive rows included) over all batches."""
    total = sum(int(b["attn_mask"].size) for b in batches)
    real = sum(int(b["attn_mask"].sum()) for b in batches)
    return 0.0 if total == 0 else 1.0 - real / total
