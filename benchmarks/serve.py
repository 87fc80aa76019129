"""Answering throughput: jprag's batched per-row merged adapters vs the PRAG reference's PEFT loop.

`--questions` real questions from the published PRAG data (`--data-dir`, default
../shared/data beside the checkout), each answered with the adapters of its 3 retrieved passages merged (PRAG's
sum of deltas), greedy, up to `--max-new-tokens` tokens, stop tokens enabled on both sides. The
prompt is the reference's inference prompt: the question in the chat template (no passages)
followed by the reference's assistant prefix "The answer is " (trailing space included).

The adapters are random but non-zero (PEFT's init for A, B ~ N(0, 1e-3²), about the size 5
AdamW steps at lr 3e-4 reach), rank 2, alpha 32, FFN targets: this measures throughput only.
Both sides use the same adapters: each document's row is exported with
`jprag.lora.peft.export_peft`.

* jprag: `merge_topk(bank, rows, scale)` then one batched `generate(..., adapters=merged)`; the
  first call (compilation) is reported separately and not timed.
* peft: the reference's `src/inference.py`, per question: `PeftModel.from_pretrained` with the
  first passage's adapter, `load_adapter` for the others, `add_weighted_adapter(weights=[1]*k,
  combination_type="cat")` (exactly Σ_i s·B_i A_i, kept unmerged as a rank-k·r adapter),
  `set_adapter("merge")`, `generate` at batch 1, `delete_adapter("merge")`, `unload()`. Adapter
  loading from disk is part of the per-question cost, as in the reference; the jprag bank is
  in memory. One untimed warm-up question first.

Also reports whether jprag's greedy answer tokens equal PEFT's for the first `--check` questions
(and for all). Prints a JSON object and a Markdown table.

    python benchmarks/serve.py [--questions 32] [--max-new-tokens 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

TARGET_SPEEDUP = 5.0  # from the issue, at 32 questions


def until_stop(tokens, stop_ids) -> list[int]:
    out = []
    for t in tokens:
        if t in stop_ids:
            break
        out.append(int(t))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", type=pathlib.Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per side (best is reported)")
    ap.add_argument("--check", type=int, default=2, help="questions whose answers are compared token by token")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        sys.exit(f"data directory {args.data_dir} not found: pass --data-dir with the PRAG *.jsonl files")

    import jax
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    from jprag.data.documents import DEFAULT_PRAG_FILES, read_prag_dir
    from jprag.eval.prompts import REFERENCE_ASSISTANT_PREFIX
    from jprag.lora.adapters import FFN_TARGETS, LoraConfig, init_bank, merge_topk
    from jprag.lora.peft import export_peft
    from jprag.model import chat
    from jprag.model.generate import SamplingConfig, generate
    from jprag.train.recipe import user_prompt

    for msg in (".*config file", ".*is_gradient_checkpointing", "Adapter merge was active"):  # expected, noisy
        warnings.filterwarnings("ignore", message=msg)
    torch.set_num_threads(args.torch_threads)
    lm = chat.load(args.model)
    tok, stop_ids = lm.tokenizer, lm.stop_ids
    pad_id = int(tok.pad_token_id or 0)

    # questions spread over the data files; their retrieved passages are their top-k documents
    per_file = math.ceil(args.questions / len(DEFAULT_PRAG_FILES))
    questions, _ = read_prag_dir(args.data_dir, limit_per_file=per_file)
    questions = questions[: args.questions]
    if len(questions) < args.questions:
        sys.exit(f"{args.data_dir}: only {len(questions)} questions, --questions {args.questions} requested")
    k = len(questions[0].doc_ids)
    if any(len(q.doc_ids) != k for q in questions):
        sys.exit("questions have different numbers of retrieved passages; merge_topk needs one k")
    doc_ids = sorted({d for q in questions for d in q.doc_ids})
    row_of = {d: i for i, d in enumerate(doc_ids)}
    rows_qk = jnp.asarray([[row_of[d] for d in q.doc_ids] for q in questions], jnp.int32)
    prompts = [lm.chat_tokens(user_prompt(q.question), assistant_prefix=REFERENCE_ASSISTANT_PREFIX)
               for q in questions]

    lora = LoraConfig(rank=2, alpha=32.0, targets=FFN_TARGETS)
    bank = init_bank(lm.cfg, lora, jax.random.key(0), len(doc_ids))
    rng = np.random.default_rng(0)
    bank = {t: {"a": ab["a"], "b": jnp.asarray(rng.normal(0.0, 1e-3, ab["b"].shape).astype(np.float32))}
            for t, ab in bank.items()}

    # ---- jprag: one batched call over every question
    def run_jprag():
        merged = merge_topk(bank, rows_qk, lora.scale)
        return generate(lm.cfg, lm.params, prompts, max_new_tokens=args.max_new_tokens, sampling=SamplingConfig(),
                        stop_ids=stop_ids, adapters=merged, pad_id=pad_id)

    t0 = time.perf_counter()
    jprag_out = run_jprag()
    jprag_first_s = time.perf_counter() - t0
    jprag_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jprag_out = run_jprag()
        jprag_s = min(jprag_s, time.perf_counter() - t0)

    # ---- PEFT: the reference's per-question load / merge / generate / unload
    path = pathlib.Path(lm.path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    base.eval()
    timing = {"adapters": 0.0, "generate": 0.0, "unload": 0.0}

    def answer_peft(i: int, adapter_root: pathlib.Path, record: bool) -> list[int]:
        nonlocal base
        t0 = time.perf_counter()
        dirs = [adapter_root / d for d in questions[i].doc_ids]
        model = peft.PeftModel.from_pretrained(base, dirs[0], adapter_name="0", is_trainable=False)
        for j, d in enumerate(dirs[1:], 1):
            model.load_adapter(d, adapter_name=str(j))
        model.add_weighted_adapter(adapters=[str(j) for j in range(k)], weights=[1.0] * k, adapter_name="merge",
                                   combination_type="cat")
        model.set_adapter("merge")
        model.eval()
        t1 = time.perf_counter()
        ids = torch.tensor([prompts[i]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1, do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
                                 return_dict_in_generate=True)
        t2 = time.perf_counter()
        model.delete_adapter("merge")
        base = model.unload()
        t3 = time.perf_counter()
        if record:
            for key, dt in zip(timing, (t1 - t0, t2 - t1, t3 - t2)):
                timing[key] += dt
        return until_stop(out.sequences[0, len(prompts[i]):].tolist(), stop_ids)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for d, r in row_of.items():
            export_peft({t: {"a": np.asarray(ab["a"][r]), "b": np.asarray(ab["b"][r])} for t, ab in bank.items()},
                        lora, root / d)
        answer_peft(0, root, record=False)  # warm-up
        peft_s, peft_out = float("inf"), []
        for _ in range(args.repeats):
            timing.update(dict.fromkeys(timing, 0.0))
            t0 = time.perf_counter()
            peft_out = [answer_peft(i, root, record=True) for i in range(len(questions))]
            seconds = time.perf_counter() - t0
            if seconds < peft_s:
                peft_s, best_timing = seconds, dict(timing)

    n = len(questions)
    check = min(args.check, n)
    same = [jprag_out[i] == peft_out[i] for i in range(n)]
    res = {
        "model": path.name,
        "questions": n,
        "top_k": k,
        "max_new_tokens": args.max_new_tokens,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "adapters": "random non-zero (A: PEFT init, B ~ N(0, 1e-3^2)), rank 2, alpha 32, gate/up/down; "
                    "the same on both sides",
        "timing": f"best of {args.repeats} pass(es) over all questions after warm-up (jprag: one compiling call; "
                  "peft: one question)",
        "jprag_questions_per_s": n / jprag_s,
        "jprag_seconds": jprag_s,
        "jprag_first_call_s": jprag_first_s,
        "jprag_generated_tokens": sum(len(o) for o in jprag_out),
        "peft_questions_per_s": n / peft_s,
        "peft_seconds": peft_s,
        "peft_seconds_breakdown": best_timing,
        "peft_merge": "PeftModel.from_pretrained + load_adapter per passage, add_weighted_adapter(cat, weights 1) + "
                      "set_adapter, generate, delete_adapter + unload (as the reference's src/inference.py)",
        "peft_generated_tokens": sum(len(o) for o in peft_out),
        "speedup": peft_s / jprag_s,
        "target_speedup": TARGET_SPEEDUP,
        f"answers_equal_first{check}": sum(same[:check]) / max(check, 1),
        "answers_equal_all": sum(same) / n,
        "examples": [{"question": questions[i].question, "jprag": tok.decode(jprag_out[i], skip_special_tokens=True),
                      "peft": tok.decode(peft_out[i], skip_special_tokens=True)} for i in range(check)],
    }
    print(json.dumps(res, indent=2))
    b = res["peft_seconds_breakdown"]
    print("\n| questions | jprag q/s | PEFT q/s | speedup (target) | jprag first call (s) "
          "| PEFT s: adapters / generate / unload | equal answers first / all |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    print(f"| {n} | {res['jprag_questions_per_s']:.2f} | {res['peft_questions_per_s']:.2f} "
          f"| {res['speedup']:.1f}x (>= {TARGET_SPEEDUP:g}x) | {jprag_first_s:.1f} "
          f"| {b['adapters']:.1f} / {b['generate']:.1f} / {b['unload']:.1f} "
          f"| {sum(same[:check])}/{check} / {sum(same)}/{n} |")
    return res


if __name__ == "__main__":
    main()
