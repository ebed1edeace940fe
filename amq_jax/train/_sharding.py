"""Data-parallel placement: the batch is split over every device of a 1-D mesh."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over ``devices`` (default: all devices of all processes)."""
  devs = np.asarray(list(devices) if devices is not None else jax.devices())
  return Mesh(devs, (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch with its leading axis split over the mesh's 'data' axis.

  Raises:
    ValueError: the batch size is not a multiple of the number of devices.
  """
  n = mesh.devices.size
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
  bad = [s for s in sizes if s % n]
  if bad:
    raise ValueError(f"batch size {bad[0]} is not divisible by the {n} devices of the mesh; "
                     f"use a batch size that is a multiple of {n}")
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))
