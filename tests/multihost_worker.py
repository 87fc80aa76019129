"""One process of a multi-host training job on a tiny random model (run by tests/test_multihost.py).

    python tests/multihost_worker.py OUT PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS [--slow-chunk]

Trains, for each mesh of `MESHES`, a PRAG bank, a Poly-PRAG inventory + routing table, Poly-z
rows (against a fixed inventory) and a DyPRAG translator (on that mesh's bank) into
`OUT/<data>x<model>/`. With one process it is the
single-process reference of the same configuration. `--slow-chunk` sleeps after saving each
PRAG chunk but the first, so a test can kill the job between chunks.
"""

from __future__ import annotations

import os
import sys

out, pid, nproc, port, ndev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
slow = "--slow-chunk" in sys.argv
only_prag = "--only-prag" in sys.argv
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jprag.distributed import DistConfig, initialize  # noqa: E402

if nproc > 1:
    # a short heartbeat: a killed peer ends this process in seconds, as a lost host ends a pod job
    initialize(DistConfig(f"127.0.0.1:{port}", nproc, pid, timeout_s=60, heartbeat_s=10))

import jprag.train.encoder as encoder  # noqa: E402
from jprag.lora.adapters import LoraConfig  # noqa: E402
from jprag.mesh import make_mesh  # noqa: E402
from jprag.model.config import ModelConfig  # noqa: E402
from jprag.model.transformer import init_params  # noqa: E402
from jprag.poly.config import PolyConfig  # noqa: E402
from jprag.poly.joint import train_joint  # noqa: E402
from jprag.poly.polyz import train_routing_rows  # noqa: E402
from jprag.poly.routing import inventory_shapes  # noqa: E402
from jprag.train.recipe import Example  # noqa: E402
from jprag.train.stacked import TrainConfig  # noqa: E402
from jprag.lora.store import load_bank  # noqa: E402
from jprag.translator.config import TranslatorConfig  # noqa: E402
from jprag.translator.train import train_translator  # noqa: E402

CFG = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=96)
LORA = LoraConfig(rank=2, alpha=32, targets=("gate", "up", "down"))
POLY = PolyConfig(n_skills=4, rank=2, batch_docs=8, epochs=1, learning_rate=5e-3, routing_learning_rate=0.05,
                  checkpoint_every=2, chunk_size=8)
MESHES = [(8, 1), (4, 2)]
N_DOCS = 20


def corpus(seed: int, n: int):
    rng = np.random.RandomState(seed)
    per_doc = []
    for _ in range(n):
        examples = []
        for _ in range(rng.randint(2, 5)):
            k = int(rng.randint(8, 60))
            mask = np.ones(k, np.int32)
            mask[0] = 0
            examples.append(Example(rng.randint(3, CFG.vocab_size, k).astype(np.int32), mask))
        per_doc.append(examples)
    return per_doc, [f"doc-{seed}-{i}" for i in range(n)]


if slow:
    real_save = encoder.save_chunk

    def slow_save(root, c, tree):
        real_save(root, c, tree)
        if c > 0:
            time.sleep(60)

    encoder.save_chunk = slow_save

params = init_params(CFG, jax.random.key(0))
docs, ids = corpus(0, N_DOCS)
new_docs, new_ids = corpus(1, 12)
for data, model in (MESHES[:1] if only_prag else MESHES):
    mesh = make_mesh(data, model)
    root = pathlib.Path(out) / f"{data}x{model}"
    encoder.encode_documents(CFG, params, docs, ids, root / "bank", lora=LORA, train=TrainConfig(learning_rate=1e-3),
                             chunk_size=8, mesh=mesh, model_id="tiny", progress=False)
    if only_prag:
        continue
    train_joint(CFG, params, docs, ids, root / "joint", poly=POLY, mesh=mesh, model_id="tiny", progress=False)
    # Poly-z rows against one fixed inventory (the joint one differs across process counts by
    # the all-reduce's rounding), so that the rows themselves can be compared bitwise.
    rng = np.random.RandomState(2)
    inventory = {t: {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in ab.items()}
                 for t, ab in sorted(inventory_shapes(CFG, POLY).items())}
    train_routing_rows(CFG, params, inventory, new_docs, new_ids, root / "rows", poly=POLY, mesh=mesh,
                       model_id="tiny", progress=False)
    # the translator: replicated, its gradient an all-reduce over the documents of a step
    teacher, _ = load_bank(root / "bank")
    emb = np.random.RandomState(3).standard_normal((N_DOCS, 16)).astype(np.float32)
    train_translator(CFG, params, LORA, TranslatorConfig(hidden=8, epochs=1, batch_docs=8, checkpoint_every=2),
                     docs, emb, teacher, ids, root / "translator", mesh=mesh, model_id="tiny", progress=False)
print(f"process {pid} of {nproc}: done", flush=True)
