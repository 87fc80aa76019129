"""One small mesh abstraction: a `('data', 'model')` device mesh and the shardings jprag uses.

- Document axes (batches, adapter banks, routing rows and their optimizer state) are sharded
  over `data`: `P('data', ...)`.
- Frozen base weights are replicated, or sharded over `model` along their widest
  independent axis (FFN hidden, attention heads, vocabulary) when that axis divides evenly.
Document counts are padded to a multiple of the `data` axis size (`pad_to_data`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'model')` mesh; `data=-1` takes every device not used by `model`."""
    devices = list(devices if devices is not None else jax.devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"--mesh-model {model}: the model axis must divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // model
    if data * model > len(devices) or data < 1:
        raise ValueError(f"--mesh-data {data} x --mesh-model {model} needs {data * model} devices, "
                         f"have {len(devices)}")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def pad_to_data(n: int, mesh: Mesh) -> int:
    """Smallest multiple of the data-axis size >= n."""
    d = data_size(mesh)
    return max(d, math.ceil(n / d) * d)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def doc_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (document) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def doc_shardings(tree: Any, mesh: Mesh) -> Any:
    """`doc_sharding` for every array leaf of a pytree (scalars replicated)."""
    return jax.tree.map(lambda x: doc_sharding(mesh, x.ndim) if np.ndim(x) else replicated(mesh), tree)


# Base-weight axis to shard over `model`, by parameter name (layer axis 0 is never sharded).
_MODEL_AXIS = {  # counted from the end, so stacked [L, in, out] and unstacked [in, out] layers agree
    "q": -1, "k": -1, "v": -1, "o": -2, "gate": -1, "up": -1, "down": -2,
    "q_bias": -1, "k_bias": -1, "v_bias": -1, "embed": -2, "lm_head": -1,
}  # fmt: skip


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """Shardings for the frozen base params: replicated when `model` is 1, else tensor-parallel."""
    n_model = mesh.shape[MODEL]

    def spec(path, x):
        name = getattr(path[-1], "key", None)
        axis = _MODEL_AXIS.get(name)
        if n_model == 1 or axis is None or x.shape[axis] % n_model:
            return replicated(mesh)
        parts = [None] * x.ndim
        parts[axis] = MODEL
        return NamedSharding(mesh, P(*parts))

    return jax.tree_util.tree_map_with_path(spec, params)


def put(tree: Any, shardings: Any) -> Any:
    return jax.device_put(tree, shardings)
