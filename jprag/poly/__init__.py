"""Poly-PRAG and Poly-z-PRAG: latent LoRA inventory + per-document Gumbel-sigmoid routing.

    config.py    PolyConfig, the `[poly]` section of a run config
    routing.py   inventory and routing init, logistic noise, Gumbel-sigmoid, normalisation,
                 merge-before mixing (`mix`)
    steps.py     the joint step (inventory + routing table) and the Poly-z step (rows only),
                 pure functions + jits with explicit shardings and donation
    joint.py     `train_joint`: the step plan, checkpointed and resumable joint training
    polyz.py     `train_routing_rows`: new documents' rows against a frozen inventory, chunked
    store.py     on-disk layout (orbax + index.json), loading, storage accounting
    pipeline.py  `PolySource` and the "poly" / "poly-z" adapter-source builders of the pipeline
"""
