"""DyPRAG: a hypernetwork (parameter translator) from document embeddings to LoRAs.

    config.py     TranslatorConfig, the `[translator]` section of a run config
    embed.py      document embeddings (pluggable; default: the base model's last-token hidden state)
    hypernet.py   the translator: stacked per-(module, layer) MLPs applied with vmap; top-k combination
    pairs.py      training pairs: PRAG adapters from jprag's encoder, all from one shared initial A
    objective.py  LM + λ_kl·KL(teacher‖student) + λ_mse·MSE
    train.py      the jitted data-parallel step, the schedule, checkpoint/resume
    store.py      translators on disk (orbax + meta.json)
    pipeline.py   the "dyprag" adapter source of `jprag eval` / `jprag run`
"""
