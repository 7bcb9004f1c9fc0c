"""Mapping the per-device steps over every device: shard_map (default) or pmap.

The per-device step is written once (:mod:`jaxtl.training.step`) with
collectives over the axis ``"data"``. Here it is mapped over a 1-D mesh of all
devices and jitted:

* ``shard_map`` (default; the pmap programming model on the API JAX recommends
  since pmap went into maintenance): the train state and the frozen variables
  are replicated (``P()``), the batch is a global array split along its first
  axis (``P("data")``).
* ``pmap``: the same function under ``jax.pmap``; the state and the frozen
  variables go in unmapped (``in_axes=None`` / ``out_axes=None``) and the batch is
  reshaped to ``(devices, per_device, ...)``. The state is still placed
  replicated over the same mesh (what pmap's ``out_axes=None`` returns): an
  uncommitted first state is a different compilation key, and the step would
  compile twice, on the first and on the second batch.

Both run the same per-device program, so they give the same result. One
device is a mesh of one. shard_map runs with ``check_vma=False``: the step
sums its gradients across devices explicitly, as under pmap. (With varying-
axis tracking on, autodiff would already sum the gradients of the replicated
parameters - the transpose of broadcasting them - and the explicit ``psum``
would count them once per device.)

Several processes (:func:`jaxtl.runtime.start_processes`): the mesh spans every
process's devices, each process loads its own slice of every global batch and
:meth:`DataParallel.put_batch` assembles the global array from the local pieces.
Outputs the step replicates (the state, summed metrics) are read on every process
from its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtl.errors import ConfigError

AXIS = "data"
# What the errors of a collective or of JAX's coordination service say when a peer process is gone.
_LOST_PROCESS_SIGNS = ("gloo", "connection reset", "connection refused", "broken pipe", "socket closed",
                       "heartbeat", "unavailable", "barrier", "deadline_exceeded", "nccl")


def lost_process(error: BaseException) -> bool:
    """Whether ``error`` (raised by a step, a transfer or a checkpoint barrier) says another process of the
    run is gone; only ever true with several processes."""
    return jax.process_count() > 1 and any(sign in str(error).lower() for sign in _LOST_PROCESS_SIGNS)
MAPPINGS = ("shard_map", "pmap")


@dataclass
class DataParallel:
    """How steps and batches are spread over the devices."""

    mapping: str = "shard_map"
    devices: tuple = ()

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ConfigError(f"unknown mapping {self.mapping!r}; choose {' or '.join(MAPPINGS)}")
        if self.mapping == "pmap" and jax.process_count() > 1:
            raise ConfigError("--mapping pmap runs in one process; several processes use the default shard_map")
        self.devices = tuple(self.devices) or tuple(jax.devices())
        self.mesh = Mesh(np.array(self.devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def local_devices(self) -> list:
        return [d for d in self.devices if d.process_index == jax.process_index()]

    def check_batch_size(self, batch_size: int, what: str = "--batch-size") -> None:
        if batch_size % self.num_devices:
            raise ConfigError(f"{what} {batch_size} is not divisible by the {self.num_devices} devices; "
                              f"use a multiple of {self.num_devices}")

    # -- steps -------------------------------------------------------------------------

    def train_step(self, step: Callable, donate: bool = True, stacked: bool = False,
                   compiler_options: dict | None = None) -> Callable:
        """(state, frozen, batch) -> (state, metrics); metrics are summed over devices.

        The state is donated (its buffers become the new state's); the frozen variables are not.
        ``stacked``: ``step`` takes batches stacked on a leading steps axis
        (:func:`jaxtl.training.step.scan_steps`; place them with :meth:`put_batches`).
        ``compiler_options``: XLA options for this step's executable alone
        (:func:`jaxtl.runtime.remat_compiler_options`).
        """
        donate_argnums = (0,) if donate else ()
        if self.mapping == "pmap":
            if compiler_options:
                raise ConfigError(f"--mapping pmap cannot compile with the XLA options {compiler_options} this "
                                  "step needs (gradient checkpointing on CPU); use the default --mapping shard_map")
            return jax.pmap(step, axis_name=AXIS, in_axes=(None, None, 0), out_axes=(None, None),
                            devices=self.devices, donate_argnums=donate_argnums)
        mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(), self._examples(stacked)),
                               out_specs=(P(), P()), check_vma=False)
        return jax.jit(mapped, donate_argnums=donate_argnums, compiler_options=compiler_options)

    def eval_step(self, step: Callable, stacked: bool = False) -> Callable:
        """(variables, batch) -> metrics; ``pred`` and ``confidence`` stay per example, the sums are global."""
        per_example = ("pred", "confidence")
        out_specs = {"loss_sum": P(), "correct": P(), "correct_topk": P(), "count": P(),
                     **{k: self._examples(stacked) for k in per_example}}
        if self.mapping == "pmap":
            out_axes = {k: (0 if k in per_example else None) for k in out_specs}
            return jax.pmap(step, axis_name=AXIS, in_axes=(None, 0), out_axes=out_axes, devices=self.devices)
        return jax.jit(jax.shard_map(step, mesh=self.mesh, in_specs=(P(), self._examples(stacked)),
                                     out_specs=out_specs, check_vma=False))

    def map_batch_fn(self, fn: Callable, out_spec: Any = None) -> Callable:
        """A function of (params, batch) with per-example outputs (feature caching)."""
        if self.mapping == "pmap":
            return jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), devices=self.devices)
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=out_spec if out_spec is not None else P(AXIS), check_vma=False))

    @staticmethod
    def _examples(stacked: bool) -> P:
        """How batches are split over the devices: along the examples (after the steps axis if stacked)."""
        return P(None, AXIS) if stacked else P(AXIS)

    # -- data ----------------------------------------------------------------------------

    def put_batch(self, batch: dict) -> Any:
        """A host batch (this process's slice) -> what the mapped step takes."""
        if self.mapping == "pmap":
            n = len(self.local_devices)
            return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        return self._put(batch, P(AXIS))

    def put_batches(self, stacked: dict) -> Any:
        """Host batches stacked on a leading steps axis (``{key: (steps, examples, ...)}``, e.g.
        ``ArrayLoader.stacked``), for a ``stacked`` step."""
        if self.mapping == "pmap":  # (steps, examples, ...) -> (devices, steps, examples per device, ...)
            n = len(self.local_devices)
            return {k: np.moveaxis(v.reshape(v.shape[0], n, v.shape[1] // n, *v.shape[2:]), 1, 0)
                    for k, v in stacked.items()}
        return self._put(stacked, P(None, AXIS))

    def _put(self, batch: dict, spec: P) -> Any:
        sharding = NamedSharding(self.mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def replicate(self, tree: Any) -> Any:
        """The tree on every device (``P()``), as both mappings return the state."""
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def abstract_replicated(self, shapes: Any) -> Any:
        """What :meth:`replicate` would give for a tree of shapes (``jax.eval_shape``'s output),
        without arrays: the target a checkpoint restores into."""
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    def unshard_per_example(self, x: Any, stacked: bool = False) -> np.ndarray:
        """Per-example outputs back to one host array in batch order (batch after batch if ``stacked``)."""
        x = np.asarray(jax.device_get(x) if jax.process_count() == 1 else
                       jax.experimental.multihost_utils.process_allgather(x, tiled=True))
        if self.mapping == "pmap":
            if stacked:  # (devices, steps, per device) -> (steps, devices, per device)
                x = np.moveaxis(x, 0, 1)
                return x.reshape(-1, *x.shape[3:])
            x = x.reshape(-1, *x.shape[2:])
        elif stacked:
            x = x.reshape(-1, *x.shape[2:])
        return x
