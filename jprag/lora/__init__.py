"""LoRA adapters: configuration, banks of per-document adapters, merging, PEFT interop."""

from jprag.lora.adapters import (  # noqa: F401
    ALL_TARGETS,
    FFN_TARGETS,
    Bank,
    LoraConfig,
    applied,
    bank_size,
    dense_delta,
    init_bank,
    merge_topk,
    stack,
    take_rows,
)
from jprag.lora.peft import PeftError, export_applied, export_peft, import_peft  # noqa: F401
