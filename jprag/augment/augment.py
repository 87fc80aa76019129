"""Document augmentation: a rewrite and generated QA pairs per passage, batched and resumable.

PRAG trains one LoRA adapter per document on an *augmented* document: the passage, an LLM
rewrite of it, and LLM-generated question/answer pairs. The prompts are those of the reference,
``src/augment.py`` of github.com/oneal2000/PRAG (commit 77c6ed8f): `REWRITE_PROMPT`
(``get_rewrite``) and `QA_PROMPT` (``qa_prompt_template``), reproduced character for character,
including the reference's missing comma after ``"answer": "Paris"`` in the JSON example (small
models copy it, so `parse_qa_json` inserts missing commas). Both are sent as a single user turn
with the model's chat template and no system prompt, as the reference's ``model_generate``
does (``apply_chat_template(..., add_generation_prompt=True)``). Both prompts see the original
passage, not the rewrite. With ``n_qa != 3`` the two ``three``s of the QA prompt are replaced
by the number word (`qa_prompt`).

Differences from the reference, on purpose:

* Batched: one `chat_generate` call for all rewrites of a batch, one for all its QA prompts.
* Decoding: the first try is greedy; a document whose QA output does not parse is retried
  (only those documents, batched) up to ``max_retries`` times, sampling with
  ``retry_temperature`` / ``retry_top_k`` and seed ``seed + attempt``. (The reference samples
  with temperature 0.7, top-k 50, and retries up to 100 times.)
* Parsing: `parse_qa_json` is lenient (code fences, prose around the JSON, trailing or missing
  commas, single quotes, ``{"qa": [...]}`` wrappers, missing ``full_answer``, truncated output)
  and keeps 1 to ``n_qa`` valid pairs, where the reference demands at least three complete ones.
* Failure: a document whose QA output still does not parse after the retries is kept with
  ``qa=()`` (the reference drops the passage), and a warning gives the count. Such a document
  has no training samples under `jprag.train.recipe`, and `jprag.train.encoder` rejects
  documents without samples: filter them (``[d for d in docs if d.qa]``) before encoding.
  Keeping them in the cache means a resumed run does not pay for them again.
* An empty rewrite (the model stopped at once) falls back to the passage text, counted in the
  same warning.

Cache (``cache_dir``): ``augmented.jsonl`` in the jprag document format
(`jprag.data.documents.read_documents_jsonl` reads it), appended once per finished batch and
flushed + fsynced; ``meta.json`` records the model id, the full prompt templates and the
`AugmentConfig`. A restart reads the finished ids back and generates only the rest, so a crash
loses at most the batch in flight (a partial last line is dropped). A cache written with a
different model, prompts or generation settings raises `AugmentCacheError` unless
``overwrite=True``, which deletes it and starts again (``batch_size`` may change freely).
One process per cache directory: concurrent writers are not detected.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from jprag.data.documents import QA, Document, read_documents_jsonl
from jprag.io import write_json_atomic

log = logging.getLogger(__name__)

REFERENCE = "github.com/oneal2000/PRAG src/augment.py (commit 77c6ed8f)"

# The reference's `get_rewrite` prompt, verbatim.
REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such "
    "as names, locations, and terminology intact, create a new version of the text that expresses "
    "the same ideas in a different way. Make sure the revised passage is distinct from the original "
    "one, but preserves the core meaning and relevant information.\n{passage}"
)

# The reference's `qa_prompt_template`, verbatim (a `str.format` template: `{{`/`}}` are braces).
QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based on "
    "the content of this passage. Each question should be answerable using the information provided "
    "in the passage. Additionally, please provide an appropriate answer for each question derived "
    "from the passage.\n"
    "You need to generate the question and answer in the following format:\n"
    "[\n"
    "    {{\n"
    '        "question": "What is the capital of France?",\n'
    '        "answer": "Paris"\n'
    '        "full_answer": "The capital of France is Paris."\n'
    "    }}, \n"
    "]\n\n"
    "This list should have at least three elements. You only need to output this list in the above "
    "format.\n"
    "Passage:\n"
    "{passage}"
)

CACHE_FILE = "augmented.jsonl"
META_FILE = "meta.json"
META_FORMAT = 1

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings.

    `model_id` names the model in the cache metadata; None uses the file or directory name of
    ``lm.path``. `system` is an optional system prompt (the reference uses none). Every field
    but `batch_size` must match an existing cache.
    """

    rewrite_max_new_tokens: int = 256
    qa_max_new_tokens: int = 384
    n_qa: int = 3
    batch_size: int = 16
    max_retries: int = 2
    retry_temperature: float = 0.7
    retry_top_k: int = 50
    seed: int = 0
    model_id: str | None = None
    system: str | None = None

    def __post_init__(self):
        for name in ("rewrite_max_new_tokens", "qa_max_new_tokens", "n_qa", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AugmentConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"AugmentConfig.max_retries must be a non-negative int, got {self.max_retries!r}")
        if not self.retry_temperature > 0:
            raise ValueError(f"AugmentConfig.retry_temperature must be > 0, got {self.retry_temperature!r}")
        if self.retry_top_k < 0:
            raise ValueError(f"AugmentConfig.retry_top_k must be >= 0, got {self.retry_top_k!r}")


class AugmentCacheError(ValueError):
    """The cache directory holds augmentations made with other settings, or is damaged."""


class GenerateFn(Protocol):
    """Batched text generation: one output string per prompt, in order.

    ``temperature == 0`` means greedy; `seed` only matters when sampling.
    """

    def __call__(self, prompts: list[str], *, max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]: ...


# ----------------------------------------------------------------------------- prompts


def rewrite_prompt(passage: str) -> str:
    """The reference's rewrite prompt for one passage."""
    return REWRITE_PROMPT.format(passage=passage)


def qa_prompt(passage: str, n_qa: int = 3) -> str:
    """The reference's QA prompt for one passage (``three`` replaced when ``n_qa != 3``)."""
    template = QA_PROMPT
    if n_qa != 3:
        word = _NUMBER_WORDS[n_qa] if n_qa < len(_NUMBER_WORDS) else str(n_qa)
        template = template.replace("generate three different", f"generate {word} different")
        template = template.replace("at least three elements", f"at least {word} elements")
    return template.format(passage=passage)


# ----------------------------------------------------------------------------- lenient JSON

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*")
_BARE = re.compile(r"[^\s,:\[\]{}\"']+")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_CLOSER = {"]": "[", "}": "{"}
_TOKEN_START = frozenset("[{,:")
_MAX_STARTS = 64
_OPENER = re.compile(r"[\[{]")


def _string_end(s: str, i: int) -> int | None:
    """Index just past the string literal opening at ``s[i]`` (its quote char), None if unclosed."""
    q, j, n = s[i], i + 1, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == q:
            return j + 1
        j += 1
    return None


def _scan(s: str, start: int) -> tuple[int | None, str | None]:
    """Scan the bracketed value opening at ``s[start]``.

    Returns ``(end, None)`` when balanced (`end` exclusive); ``(None, salvage)`` when the text
    ends inside it, where `salvage` cuts after the last complete nested object/array and closes
    the open brackets (None if nothing is complete); ``(None, None)`` on a mismatched bracket.
    """
    stack: list[str] = []
    prev = ""  # last significant char outside strings
    last_cut: tuple[int, tuple[str, ...]] | None = None
    i, n = start, len(s)
    while i < n:
        c = s[i]
        if c == '"' or (c == "'" and prev in _TOKEN_START):
            j = _string_end(s, i)
            if j is None:
                break
            i, prev = j, '"'
            continue
        if c in "[{":
            stack.append(c)
        elif c in "]}":
            if not stack or stack[-1] != _CLOSER[c]:
                return None, None
            stack.pop()
            if not stack:
                return i + 1, None
            last_cut = (i + 1, tuple(stack))
        if not c.isspace():
            prev = c
        i += 1
    if last_cut is None:
        return None, None
    pos, open_ = last_cut
    return None, s[start:pos] + "".join("]" if b == "[" else "}" for b in reversed(open_))


def _decode_string(raw: str) -> str:
    try:
        if raw[0] == '"':
            return json.loads(raw, strict=False)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(raw)
        if isinstance(value, str):
            return value
    except Exception:  # noqa: BLE001 - any malformed literal
        pass
    return raw[1:-1].replace("\\" + raw[0], raw[0])


def _repair(s: str) -> str:
    """Re-emit JSON-ish text as JSON: single-quoted strings, Python constants, unquoted keys,
    trailing / leading / doubled commas dropped, missing commas between values inserted."""
    out: list[str] = []
    prev = ""  # kind of the last emitted token: open, close, value, colon, comma

    def value(tok: str) -> None:
        nonlocal prev
        if prev in ("value", "close"):
            out.append(",")
        out.append(tok)
        prev = "value"

    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
        elif c in "[{":
            if prev in ("value", "close"):
                out.append(",")
            out.append(c)
            prev, i = "open", i + 1
        elif c in "]}":
            if prev == "comma":
                out.pop()
            out.append(c)
            prev, i = "close", i + 1
        elif c == ",":
            if prev in ("value", "close"):
                out.append(",")
                prev = "comma"
            i += 1
        elif c == ":":
            out.append(":")
            prev, i = "colon", i + 1
        elif c in "\"'":
            j = _string_end(s, i)
            if j is None:
                raise ValueError("unterminated string")
            value(json.dumps(_decode_string(s[i:j]), ensure_ascii=False))
            i = j
        else:
            m = _BARE.match(s, i)
            word, i = m.group(0), m.end()
            word = {"True": "true", "False": "false", "None": "null"}.get(word, word)
            rest = s[i:].lstrip()
            if rest.startswith(":") and not _NUMBER.fullmatch(word):
                word = json.dumps(word)  # unquoted key
            value(word)
    return "".join(out)


def _loads(span: str) -> Any:
    """Parse a JSON-ish span: strict JSON, then the repaired text, then a Python literal."""
    try:
        return json.loads(span)
    except ValueError:
        pass
    try:
        return json.loads(_repair(span))
    except ValueError:
        pass
    try:
        return ast.literal_eval(span)
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError, RecursionError, ...
        raise ValueError("not a JSON or Python literal") from None


def _text(v: Any, numbers: bool = False) -> str | None:
    if isinstance(v, str):
        return v.strip() or None
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return str(v)  # the reference turns int answers into strings
    if numbers and isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        return ", ".join(x.strip() for x in v)  # ... and joins list answers
    return None


def _to_qa(item: Any) -> QA | None:
    if not isinstance(item, dict):
        return None
    d = {str(k).strip().lower(): v for k, v in item.items()}
    question = _text(d.get("question"))
    answer = _text(d.get("answer"), numbers=True)
    if question is None or answer is None:
        return None
    full = _text(d.get("full_answer"), numbers=True) or answer
    return QA(question, answer, full)


def _is_qa_dict(v: Any) -> bool:
    return isinstance(v, dict) and any(str(k).strip().lower() == "question" for k in v)


def _find_qa(value: Any, depth: int = 0) -> tuple[list[QA], bool] | None:
    """The valid pairs of the first container in `value` holding any, and whether that container
    is a single QA object (not a list). None if there is none."""
    if depth > 8:
        return None
    if _is_qa_dict(value):
        qa = _to_qa(value)
        return ([qa], True) if qa else None
    if isinstance(value, list) and any(_is_qa_dict(x) for x in value):
        qas = [q for q in map(_to_qa, value) if q is not None]
        if qas:
            return qas, False
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _find_qa(child, depth + 1)
        if found:
            return found
    return None


def _parse_qa(text: Any, n: int) -> list[QA] | None:
    if not isinstance(text, str):
        return None
    text = _FENCE.sub("\n", text)
    found: list[QA] = []
    pos, tries = 0, 0
    while tries < _MAX_STARTS and len(found) < n:
        m = _OPENER.search(text, pos)
        if m is None:
            break
        start, tries = m.start(), tries + 1
        end, salvage = _scan(text, start)
        span = text[start:end] if end is not None else salvage
        if span is None:
            pos = start + 1
            continue
        try:
            value = _loads(span)
        except ValueError:
            pos = start + 1  # maybe a later / nested bracket starts real JSON
            continue
        hit = _find_qa(value)
        pos = end if end is not None else len(text)  # a parsed value's insides were searched
        if hit is None:
            continue
        qas, single = hit
        found += qas
        if not single:  # a list: the answer (after any single objects before it)
            break
        # single objects: keep collecting, models often emit one object per line
    out: list[QA] = []
    seen: set[tuple[str, str]] = set()
    for qa in found:
        if (qa.question, qa.answer) not in seen:
            seen.add((qa.question, qa.answer))
            out.append(qa)
    return out[:n] or None


def parse_qa_json(text: str, n: int = 3) -> list[QA] | None:
    """QA pairs from an LLM's answer to the QA prompt, or None if it holds no valid pair.

    Accepts a bare list of ``{"question", "answer", "full_answer"}`` objects, an object wrapping
    such a list under any key (``{"qa": [...]}``), or consecutive single objects; markdown code
    fences and text before/after are ignored; trailing, doubled and missing commas, single-quoted
    strings, unquoted keys and Python constants are repaired. Truncated output keeps the complete
    objects before the cut. An item is valid with a non-empty string ``question`` and a
    non-empty ``answer`` (string; a number or a list of strings is converted as the reference
    does); ``full_answer`` defaults to ``answer``; keys are case-insensitive. Returns the first
    `n` distinct valid pairs. Never raises on any input text.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    try:
        return _parse_qa(text, n)
    except Exception:  # noqa: BLE001 - garbage in, None out
        log.debug("parse_qa_json failed on %r", text, exc_info=True)
        return None


# ----------------------------------------------------------------------------- cache


def _meta(model_id: str, cfg: AugmentConfig) -> dict:
    config = dataclasses.asdict(cfg)
    config.pop("model_id")
    return {
        "format": META_FORMAT,
        "model": model_id,
        "prompts": {"rewrite": REWRITE_PROMPT, "qa": QA_PROMPT},
        "prompt_source": REFERENCE,
        "config": config,
    }


_FREE_CONFIG = ("batch_size",)  # may differ between runs sharing a cache


def _meta_differences(old: Any, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["meta.json is not a JSON object"]
    diffs = []
    for key in ("format", "model"):
        if old.get(key) != new[key]:
            diffs.append(f"{key}: cache {old.get(key)!r}, now {new[key]!r}")
    old_prompts = old.get("prompts") if isinstance(old.get("prompts"), dict) else {}
    for name, text in new["prompts"].items():
        if old_prompts.get(name) != text:
            diffs.append(f"{name} prompt differs")
    old_cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
    for key, v in new["config"].items():
        if key not in _FREE_CONFIG and old_cfg.get(key) != v:
            diffs.append(f"config.{key}: cache {old_cfg.get(key)!r}, now {v!r}")
    return diffs


def _drop_partial_line(path: pathlib.Path) -> None:
    """Truncate a crash's partial last line (no trailing newline) off the cache file."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run",
                        path, len(data) - cut)
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())


def _open_cache(cache_dir: pathlib.Path, meta: dict, overwrite: bool) -> dict[str, Document]:
    """Check or write the metadata; the finished documents by id."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache, meta_path = cache_dir / CACHE_FILE, cache_dir / META_FILE
    if overwrite:
        for p in (cache, meta_path):
            p.unlink(missing_ok=True)
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise AugmentCacheError(f"{meta_path}: unreadable ({e}); pass overwrite=True to start again") from None
        diffs = _meta_differences(old, meta)
        if diffs:
            raise AugmentCacheError(
                f"{cache_dir}: the cache was made with other settings ({'; '.join(diffs)}); "
                "use another cache_dir or pass overwrite=True to discard it"
            )
    elif cache.exists() and cache.stat().st_size:
        raise AugmentCacheError(
            f"{cache}: found without {META_FILE}, so its model and prompts are unknown; "
            "pass overwrite=True to discard it"
        )
    else:
        write_json_atomic(meta_path, meta, end="\n", ensure_ascii=False, indent=2)
    if not cache.exists():
        return {}
    _drop_partial_line(cache)
    try:
        docs = read_documents_jsonl(cache)
    except ValueError as e:
        raise AugmentCacheError(f"damaged augmentation cache: {e}; pass overwrite=True to start again") from None
    return {d.id: d for d in docs}


def _append(path: pathlib.Path, docs: Sequence[Document]) -> None:
    lines = "".join(
        json.dumps({"id": d.id, "passage": d.passage, "rewrite": d.rewrite,
                    "qa": [dataclasses.asdict(q) for q in d.qa]}, ensure_ascii=False) + "\n"
        for d in docs
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- augmentation


def chat_generate_fn(lm: Any, cfg: AugmentConfig = AugmentConfig()) -> GenerateFn:
    """The default `GenerateFn`: `jprag.model.chat.chat_generate` with `lm` (top-k
    ``cfg.retry_top_k`` when sampling, ``cfg.system`` as system prompt)."""
    from jprag.model.chat import chat_generate

    def generate(prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        return chat_generate(
            prompts, model=lm, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=cfg.retry_top_k if temperature > 0 else 0, seed=seed, system=cfg.system,
        )

    return generate


def _model_id(lm: Any, cfg: AugmentConfig) -> str:
    if cfg.model_id:
        return cfg.model_id
    path = getattr(lm, "path", None)
    if not path:
        raise ValueError("AugmentConfig.model_id is required when lm has no path (e.g. lm=None with a generate_fn)")
    return pathlib.Path(str(path)).name


def _unique_passages(passages: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(passages):
        try:
            doc_id, passage = item
        except (TypeError, ValueError):
            raise ValueError(f"passages[{i}] must be an (id, passage) pair, got {item!r:.80}") from None
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError(f"passages[{i}]: id must be a non-empty string, got {doc_id!r}")
        if not isinstance(passage, str):
            raise ValueError(f"passages[{i}] ({doc_id}): passage must be a string, got {type(passage).__name__}")
        if out.setdefault(doc_id, passage) != passage:
            raise ValueError(f"passages[{i}]: id {doc_id!r} is used for two different passages")
    return out


def _call(generate_fn: Callable, prompts: list[str], **kw) -> list[str]:
    outs = list(generate_fn(prompts, **kw))
    if len(outs) != len(prompts):
        raise RuntimeError(f"generate_fn returned {len(outs)} outputs for {len(prompts)} prompts")
    return ["" if o is None else str(o) for o in outs]


def _augment_batch(generate_fn: Callable, items: list[tuple[str, str]], cfg: AugmentConfig
                   ) -> tuple[list[Document], int, int]:
    """Documents of one batch, the number of QA failures and of empty rewrites."""
    passages = [p for _, p in items]
    greedy = dict(temperature=0.0, seed=cfg.seed)
    rewrites = _call(generate_fn, [rewrite_prompt(p) for p in passages],
                     max_new_tokens=cfg.rewrite_max_new_tokens, **greedy)
    qa_prompts = [qa_prompt(p, cfg.n_qa) for p in passages]
    outs = _call(generate_fn, qa_prompts, max_new_tokens=cfg.qa_max_new_tokens, **greedy)
    qas: list[list[QA] | None] = [parse_qa_json(o, cfg.n_qa) for o in outs]
    for attempt in range(1, cfg.max_retries + 1):
        todo = [i for i, q in enumerate(qas) if q is None]
        if not todo:
            break
        outs = _call(generate_fn, [qa_prompts[i] for i in todo], max_new_tokens=cfg.qa_max_new_tokens,
                     temperature=cfg.retry_temperature, seed=cfg.seed + attempt)
        for i, o in zip(todo, outs):
            qas[i] = parse_qa_json(o, cfg.n_qa)
    docs, empty_rewrites = [], 0
    for (doc_id, passage), rewrite, qa in zip(items, rewrites, qas):
        rewrite = rewrite.strip()
        if not rewrite:
            empty_rewrites += 1
            rewrite = passage
        docs.append(Document(doc_id, passage, rewrite, tuple(qa or ())))
    return docs, sum(q is None for q in qas), empty_rewrites


def augment_documents(
    lm: Any,
    passages: Sequence[tuple[str, str]],
    cache_dir: str | os.PathLike,
    cfg: AugmentConfig = AugmentConfig(),
    progress: bool = True,
    *,
    generate_fn: GenerateFn | None = None,
    overwrite: bool = False,
) -> list[Document]:
    """Augment ``(id, passage)`` pairs into `Document`s (rewrite + up to ``cfg.n_qa`` QA pairs).

    `lm` is a `jprag.model.chat.LoadedModel` (generation goes through `chat_generate_fn`), or
    anything (e.g. None, with ``cfg.model_id`` set) when `generate_fn` is given: a `GenerateFn`
    called as ``generate_fn(prompts, max_new_tokens=, temperature=, seed=)``. Passages are
    processed in batches of ``cfg.batch_size``: one call for the rewrites, one for the QA
    prompts, then up to ``cfg.max_retries`` sampled calls for the documents whose QA output did
    not parse. Documents that still fail get ``qa=()`` (see the module docstring: filter them
    before encoding). Each finished batch is appended to ``cache_dir/augmented.jsonl``; ids
    already there are not generated again. Repeated ids with the same passage are augmented
    once. Returns one document per distinct id, in input order.
    """
    items = _unique_passages(passages)
    if generate_fn is None:
        if lm is None:
            raise ValueError("augment_documents needs a model (lm) or a generate_fn")
        generate_fn = chat_generate_fn(lm, cfg)
    cache_dir = pathlib.Path(cache_dir)
    done = _open_cache(cache_dir, _meta(_model_id(lm, cfg), cfg), overwrite)
    for doc_id, passage in items.items():
        if doc_id in done and done[doc_id].passage != passage:
            raise AugmentCacheError(
                f"{cache_dir / CACHE_FILE}: document {doc_id!r} was cached for a different passage"
            )
    todo = [(i, p) for i, p in items.items() if i not in done]
    n_cached = len(items) - len(todo)
    if n_cached:
        log.info("augment: %d of %d documents found in %s", n_cached, len(items), cache_dir)

    from tqdm.auto import tqdm

    failed = empty = 0
    with tqdm(total=len(items), initial=n_cached, disable=not progress, desc="augment", unit="doc") as bar:
        for b in range(0, len(todo), cfg.batch_size):
            docs, f, e = _augment_batch(generate_fn, todo[b:b + cfg.batch_size], cfg)
            _append(cache_dir / CACHE_FILE, docs)
            done.update((d.id, d) for d in docs)
            failed, empty = failed + f, empty + e
            bar.update(len(docs))
            if failed:
                bar.set_postfix(no_qa=failed)
    out = [done[i] for i in items]
    no_qa = sum(not d.qa for d in out)
    if no_qa or empty:
        log.warning(
            "augment: %d of %d documents have no QA pairs (qa=(); %d from this run) - they have no "
            "training samples, filter them before encoding; %d empty rewrites in this run were "
            "replaced by the passage", no_qa, len(out), failed, empty,
        )
    return out
