"""Multi-host (multi-controller) execution: one process per host, each driving its own devices.

Every command that trains or answers calls `initialize` once, before any device is used. With
one process nothing happens; with several, `jax.distributed.initialize` connects them through
the coordinator (process 0's host), after which `jax.devices()` lists every process's devices,
a `Mesh` spans them all, and a jitted step is one SPMD program over the whole mesh.

Settings come from flags (`--coordinator HOST:PORT --num-processes N --process-id I`), else the
environment (`JPRAG_COORDINATOR`, `JPRAG_NUM_PROCESSES`, `JPRAG_PROCESS_ID`), else
`--coordinator auto`, which leaves detection to JAX (TPU VMs, SLURM, Open MPI).

The rules the trainers follow, all through this module:

* Host data. A process builds only the rows of a global batch that its own devices hold
  (`global_array` calls back once per addressable shard); no process materialises a global
  array, and results are read back only from addressable shards (`local_rows`).
* Files. Arrays are written collectively by orbax (each process its own shards); `index.json`,
  results and plots are written by process 0 only (`is_primary`), then `barrier` so no
  process reads a file another is still writing.
* Output. Progress bars and logs print on process 0.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

ENV = {"coordinator": "JPRAG_COORDINATOR", "num_processes": "JPRAG_NUM_PROCESSES", "process_id": "JPRAG_PROCESS_ID",
       "heartbeat_s": "JPRAG_HEARTBEAT_TIMEOUT"}
AUTO = "auto"


class DistributedError(ValueError):
    """Bad multi-host settings, or the processes could not connect."""


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """How this process joins a multi-host job. `coordinator=None`: a single process."""

    coordinator: str | None = None  # "HOST:PORT" of process 0, or "auto" (JAX detects the cluster)
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300  # give up connecting after this long (an unreachable coordinator is an error)
    heartbeat_s: int | None = None  # a process silent this long has failed, the others stop (None: JAX's 100 s)

    @classmethod
    def from_env(cls, **overrides) -> "DistConfig":
        """Flags (`overrides`, None = not given) over `JPRAG_*` environment variables."""
        values = {}
        for field, var in ENV.items():
            value = overrides.get(field)
            if value is None and os.environ.get(var):
                raw = os.environ[var]
                if field == "coordinator":
                    value = raw
                else:
                    try:
                        value = int(raw)
                    except ValueError:
                        raise DistributedError(f"${var}: expected an integer, got {raw!r}") from None
            values[field] = value
        timeout = overrides.get("timeout_s")
        return cls(**values, **({} if timeout is None else {"timeout_s": timeout}))

    def check(self) -> None:
        """Raise `DistributedError` naming the flag when the settings cannot describe a job."""
        n, i = self.num_processes, self.process_id
        if self.coordinator is None:
            if (n or 1) > 1 or i not in (None, 0):
                raise DistributedError("--num-processes/--process-id need --coordinator HOST:PORT (or auto)")
            return
        if self.coordinator != AUTO:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise DistributedError(f"--coordinator: expected HOST:PORT or 'auto', got {self.coordinator!r}")
            if n is None or i is None:
                raise DistributedError("--coordinator HOST:PORT needs --num-processes and --process-id")
        if n is not None and n < 1:
            raise DistributedError(f"--num-processes: must be >= 1, got {n}")
        if i is not None and n is not None and not 0 <= i < n:
            raise DistributedError(f"--process-id: must be in [0, {n}) for --num-processes {n}, got {i}")
        if self.timeout_s < 1:
            raise DistributedError(f"--coordinator-timeout: must be >= 1 second, got {self.timeout_s}")
        if self.heartbeat_s is not None and self.heartbeat_s < 1:
            raise DistributedError(f"--heartbeat-timeout: must be >= 1 second, got {self.heartbeat_s}")

    @property
    def multi(self) -> bool:
        return self.coordinator is not None and (self.coordinator == AUTO or (self.num_processes or 1) > 1)


def initialize(cfg: DistConfig | None = None) -> None:
    """Join the multi-host job `cfg` describes (default: from the environment); call once per
    process before any device is used. A single-process config does nothing."""
    import jax

    cfg = cfg or DistConfig.from_env()
    cfg.check()
    if not cfg.multi:
        return
    if jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend for cross-process all-reduces (tests, CI); it is
    # ignored on TPU/GPU, which bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator != AUTO and cfg.process_id:
        # JAX's client aborts the whole process (a fatal log, no exception) when it cannot reach
        # the coordinator; probing first turns that into one clear error within the timeout.
        _wait_for_coordinator(cfg)
    kwargs = {} if cfg.coordinator == AUTO else dict(
        coordinator_address=cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=cfg.timeout_s,
                                   heartbeat_timeout_seconds=cfg.heartbeat_s or 100)
    except Exception as e:  # noqa: BLE001 - jaxlib raises bare RuntimeErrors/XlaRuntimeErrors here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "auto-detected cluster" if cfg.coordinator == AUTO else f"coordinator {cfg.coordinator}"
        raise DistributedError(f"could not join the multi-host job ({where}, process "
                               f"{cfg.process_id} of {cfg.num_processes}, timeout {cfg.timeout_s} s): {first[:300]}"
                               ) from None


def _wait_for_coordinator(cfg: DistConfig) -> None:
    import socket
    import time

    host, _, port = cfg.coordinator.rpartition(":")
    deadline = time.monotonic() + cfg.timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, cfg.timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"could not join the multi-host job (coordinator {cfg.coordinator}, process "
                                       f"{cfg.process_id} of {cfg.num_processes}): nothing answered there within "
                                       f"{cfg.timeout_s} s ({e.strerror or e}); start process 0 with the same "
                                       "--coordinator, or check the address") from None
            time.sleep(0.5)


# Words of the runtime's errors when a collective or barrier lost a peer (gloo, the
# coordination service); an out-of-memory or compile error is not one of these.
_PEER_FAILURE = ("Gloo", "gloo", "heartbeat", "Barrier failed", "Connection closed", "Connection reset",
                 "UNAVAILABLE", "DEADLINE_EXCEEDED", "task is set to ERROR")


def peer_failure(exc: BaseException) -> str | None:
    """The one-line message for `exc` when it is a collective that failed because another
    process of the job died or stopped answering; None for any other error (or one process)."""
    import jax

    if not jax.distributed.is_initialized() or not isinstance(exc, jax.errors.JaxRuntimeError):
        return None
    text = str(exc)
    if not any(word in text for word in _PEER_FAILURE):
        return None
    first = text.strip().splitlines()[0][:200]
    return (f"process {process_index()}: a collective across the job failed, so another process has died or "
            f"stopped answering ({first}); restart every process with the same command: finished work is kept")


def exit_job(code: int) -> None:
    """End this process now. After a peer failed, a normal exit would wait in JAX's shutdown
    barrier for the dead process until the heartbeat timeout; there is nothing left to sync."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that writes indexes, results and plots, and prints progress."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_only(fn: Callable[[], None], name: str) -> None:
    """Run `fn` on process 0 only, then `barrier(name)`, so the others see what it wrote."""
    if is_primary():
        fn()
    barrier(name)


def check_mesh(mesh) -> None:
    """A multi-host mesh must hold devices of every process (each one builds its own rows)."""
    import jax

    if jax.process_count() == 1:
        return
    held = {d.process_index for d in mesh.devices.flat}
    missing = sorted(set(range(jax.process_count())) - held)
    if missing:
        raise DistributedError(f"--mesh-data x --mesh-model = {mesh.devices.size} devices leave process(es) "
                               f"{missing} without a device; use every device of the job "
                               f"({jax.device_count()}), e.g. --mesh-data -1")


def _rows_of(index: tuple, n: int) -> range:
    s = index[0] if index else slice(None)
    return range(*s.indices(n))


def local_rows(sharding, n: int) -> list[int]:
    """Sorted global indices of the leading-axis rows this process's devices hold."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((n,)).values():
        rows.update(_rows_of(index, n))
    return sorted(rows)


def global_array(sharding, shape: tuple[int, ...], dtype, rows: Callable[[list[int]], np.ndarray]):
    """A global `jax.Array` of `shape` sharded by `sharding` whose leading-axis rows are built by
    `rows(indices) -> [len(indices), *shape[1:]]`, called only for rows this process holds.
    (`jax.make_array_from_callback`, one call per addressable shard; rows shared by several
    local devices, e.g. over a `model` axis, are built once.)"""
    import jax

    n = shape[0]
    mine = local_rows(sharding, n)
    block = np.asarray(rows(mine), dtype).reshape((len(mine), *shape[1:]))
    where = {r: i for i, r in enumerate(mine)}

    def shard(index):
        sel = [where[r] for r in _rows_of(index, n)]
        return block[sel][(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def addressable_rows(x) -> dict[int, np.ndarray]:
    """Global row index → that row's values, for the rows of a leading-axis-sharded array this
    process holds (no cross-process transfer)."""
    n = x.shape[0]
    out: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        data = np.asarray(shard.data)
        for j, r in enumerate(_rows_of(shard.index, n)):
            out.setdefault(r, data[j])
    return out


def to_host(x) -> np.ndarray:
    """A small array's full value on every process (an all-gather for arrays split across
    processes): for per-document losses and similar metadata, never for adapter banks."""
    import jax

    if jax.process_count() == 1 or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
