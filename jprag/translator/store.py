"""Translators on disk: orbax checkpoints plus a JSON description.

Layout of a translator directory::

    meta.json        format, model id, LoRA config, translator settings, spec (shapes), training
                     document ids, the step schedule, the last checkpointed step, done flag,
                     loss history
    ckpt/<step>/     orbax checkpoint of {"translator", "opt"} at that step (only the latest kept)
    final/           orbax checkpoint of the finished translator alone (written when done)

A checkpoint is written whole before `meta.json` (replaced atomically) points at it, so a killed
run resumes from the last checkpoint that `meta.json` names; directories it does not name are
leftovers and are replaced. Arrays are saved from host memory and restored as numpy.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import numpy as np

from jprag import distributed
from jprag import store as jstore
from jprag.lora.adapters import LoraConfig
from jprag.translator.hypernet import Translator, TranslatorSpec

FORMAT = "jprag-translator/1"
META = "meta.json"


class TranslatorError(ValueError):
    """A translator directory is missing, unfinished or incompatible with the request."""


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def write_meta(root: pathlib.Path, meta: Mapping[str, Any]) -> None:
    """Atomically (re)write `meta.json` (process 0, then every process synchronises)."""
    jstore.write_index(root, meta, META)


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(root) / META
    if not path.is_file():
        raise TranslatorError(f"{path}: no translator here (expected a directory written by `jprag translator train`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TranslatorError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise TranslatorError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for field in ("model", "lora", "translator", "spec", "doc_ids", "step", "done"):
        if field not in meta:
            raise TranslatorError(f"{path}: field {field!r} is missing")
    return meta


def find_translator(path: str | os.PathLike) -> pathlib.Path:
    """A translator directory given itself or the `--out` directory of `jprag translator train`."""
    path = pathlib.Path(path)
    if not (path / META).is_file() and (path / "translator" / META).is_file():
        return path / "translator"
    return path


def _template(tree) -> Any:
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)  # arrays or ShapeDtypeStructs


def _save(path: pathlib.Path, tree) -> None:
    """Collective orbax write (replicated state: one copy), replacing a killed run's leftover."""
    jstore.save_tree(path, tree)


def checkpoint_dir(root: pathlib.Path, step: int) -> pathlib.Path:
    return root / "ckpt" / f"{step:08d}"


def save_checkpoint(root: pathlib.Path, step: int, state: Mapping[str, Any], meta: dict[str, Any]) -> None:
    """Write `state` ({"translator", "opt"}) for `step`, point `meta.json` at it, drop older ones."""
    _save(checkpoint_dir(root, step), state)
    meta["step"] = step
    write_meta(root, meta)
    def drop_older():
        for old in (root / "ckpt").iterdir():
            if old.name != f"{step:08d}":
                shutil.rmtree(old, ignore_errors=True)

    distributed.primary_only(drop_older, f"drop checkpoints before {step}")


def load_checkpoint(root: pathlib.Path, step: int, template: Mapping[str, Any]) -> Any:
    """Restore the checkpoint of `step` as numpy arrays shaped like `template`."""
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise TranslatorError(f"{root}/{META} names step {step}, but {path} is missing; "
                              "delete the directory to train from scratch")
    return _checkpointer().restore(path.absolute(), _template(template))


def save_final(root: pathlib.Path, translator: Translator, meta: dict[str, Any]) -> None:
    """Write the finished translator, mark it done, and drop the optimizer checkpoints."""
    _save(root / "final", translator)
    meta["done"] = True
    write_meta(root, meta)
    jstore.remove(root / "ckpt")


def lora_from_meta(meta: Mapping[str, Any]) -> LoraConfig:
    return LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})


def load_translator(root: str | os.PathLike) -> tuple[TranslatorSpec, Translator, dict[str, Any]]:
    """`(spec, translator (numpy), meta)` of a finished translator directory."""
    root = find_translator(root)
    meta = read_meta(root)
    if not meta["done"]:
        raise TranslatorError(f"{root}: training is not finished (step {meta['step']}); re-run "
                              "`jprag translator train` with the same arguments to resume")
    spec = TranslatorSpec.from_json(meta["spec"])
    translator = _checkpointer().restore((root / "final").absolute(), spec.template())
    return spec, translator, meta
