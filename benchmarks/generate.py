"""Decode throughput: jprag's compiled generate loop vs transformers' `generate`, same CPU, same model.

Both sides load the same GGUF file (the embedded SmolLM2-135M-Instruct by default), run greedy
decoding of exactly `--new-tokens` tokens (stop tokens disabled) on the same chat prompts, and
report generated tokens per second after one warm-up call (jprag's compile time is reported
separately). Prints a JSON object and a Markdown table.

Each row also carries the memory-bandwidth ceiling of decoding: every decode step reads all
weights (540 MB in fp32 for SmolLM2-135M) and the KV cache once, so no implementation decodes
faster than `batch / ((weight bytes + cache bytes) / read bandwidth)` tokens/s, with the
bandwidth measured here (a jitted sum over 1 GiB). `jprag / ceiling` says how far the
decode loop is from that bound; `ceiling / transformers` the best ratio any implementation
could reach against this transformers on this machine.

Every configuration runs twice, `--weight-dtypes float32 bfloat16`: jprag's bf16 weights
(`weight_dtype="bfloat16"`: bf16 storage and matmul operands, float32 accumulation and
activations) against transformers in bfloat16, and each row also gives the ratio against
transformers in float32.

    python benchmarks/generate.py [--model PATH.gguf] [--batch-sizes 1 16] [--new-tokens 64]
                                  [--weight-dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# jprag's weight dtypes; transformers runs in the torch dtype of the same name. With bfloat16
# jprag keeps activations in float32 and only the matmul operands in bf16
# (ModelConfig.weight_dtype); transformers' bfloat16 is bf16 throughout — the cheaper of the two.
WEIGHT_DTYPES = ("float32", "bfloat16")

PROMPTS = [
    "Write a short paragraph about the history of the bicycle.",
    "Explain how a refrigerator works.",
    "What are the main causes of the seasons on Earth?",
    "Give three tips for learning a new language.",
]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of streaming `nbytes` of fp32 from memory (a jitted sum; the best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    return nbytes / timed(lambda: f(x).block_until_ready(), repeats)


def decode_ceiling(cfg, params, batch: int, prompt_len: int, new_tokens: int, bandwidth: float) -> float:
    """Tokens/s upper bound of decoding: each step reads every weight and the whole KV cache (the
    bucketed slots jprag allocates) once. Prefill and compute are ignored, so it is optimistic."""
    import jax

    from jprag.model.generate import program_shape
    from jprag.model.transformer import KVCache

    _, P, max_new = program_shape(batch, prompt_len, new_tokens)
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, P + max_new))  # shapes only, nothing allocated
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return batch * bandwidth / (nbytes(params) + nbytes((cache.k, cache.v)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weight-dtypes", nargs="+", choices=WEIGHT_DTYPES, default=list(WEIGHT_DTYPES),
                    help="jprag weight dtypes to run; transformers runs in the same dtype")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from jprag.model import chat
    from jprag.model.generate import SamplingConfig, generate

    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = read_bandwidth()
    results = {"new_tokens": args.new_tokens, "cpu_count": os.cpu_count(),
               "read_bandwidth_GBps": bandwidth / 1e9, "rows": []}
    for weight_dtype in args.weight_dtypes:
        lm = chat.load(args.model, weight_dtype=None if weight_dtype == "float32" else weight_dtype)
        path = pathlib.Path(lm.path)
        results["model"] = path.name
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=getattr(torch, weight_dtype))
        hf.eval()
        for bs in args.batch_sizes:
            prompts = [lm.chat_tokens(PROMPTS[i % len(PROMPTS)]) for i in range(bs)]

            def run_jprag():
                out = generate(lm.cfg, lm.params, prompts, max_new_tokens=args.new_tokens, stop_ids=[],
                               sampling=SamplingConfig())
                assert all(len(o) == args.new_tokens for o in out)

            t0 = time.perf_counter()
            run_jprag()
            compile_s = time.perf_counter() - t0
            jprag_s = timed(run_jprag, args.repeats)

            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                assert out.shape[1] == width + args.new_tokens

            run_hf()
            hf_s = timed(run_hf, args.repeats)
            n = bs * args.new_tokens
            ceiling = decode_ceiling(lm.cfg, lm.params, bs, width, args.new_tokens, bandwidth)
            results["rows"].append({
                "weight_dtype": weight_dtype,
                "batch": bs,
                "jprag_tokens_per_s": n / jprag_s,
                "transformers_tokens_per_s": n / hf_s,  # transformers in the same dtype
                "ratio": hf_s / jprag_s,
                "jprag_first_call_s": compile_s,
                "bandwidth_ceiling_tokens_per_s": ceiling,
                "jprag_fraction_of_ceiling": n / jprag_s / ceiling,
                "ceiling_ratio": ceiling * hf_s / n,  # the best ratio any implementation could reach
            })
        del hf
    # every row against transformers in float32 (the common baseline), whatever the run order
    hf_fp32 = {r["batch"]: r["transformers_tokens_per_s"] for r in results["rows"] if r["weight_dtype"] == "float32"}
    for r in results["rows"]:
        base = hf_fp32.get(r["batch"])
        r["ratio_vs_transformers_fp32"] = None if base is None else r["jprag_tokens_per_s"] / base

    print(json.dumps(results, indent=2))
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("\n| weights | batch | jprag tok/s | transformers tok/s (same dtype) | ratio | ratio vs transformers fp32 "
          "| bandwidth ceiling tok/s | jprag / ceiling | ceiling / transformers | jprag first call (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        vs32 = "–" if r["ratio_vs_transformers_fp32"] is None else f"{r['ratio_vs_transformers_fp32']:.2f}x"
        print(f"| {r['weight_dtype']} | {r['batch']} | {r['jprag_tokens_per_s']:.1f} "
              f"| {r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {vs32} "
              f"| {r['bandwidth_ceiling_tokens_per_s']:.1f} | {r['jprag_fraction_of_ceiling']:.0%} "
              f"| {r['ceiling_ratio']:.2f}x | {r['jprag_first_call_s']:.1f} |")
    return results


if __name__ == "__main__":
    main()
