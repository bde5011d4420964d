"""Device mesh and multi-process set-up.

The mesh has two axes: 'data' and 'model'. Batches are split over both (each
device is a data-parallel replica of the MLPs); embedding stacks are split
over 'model' and repeated over 'data'. The default, data=1 and model=-1, is
TorchRec's layout: every device holds a share of the tables and of the batch.
Use data > 1 to repeat the table shards (e.g. one copy per host).

The mesh uses `AxisType.Auto` axes: the MLPs are partitioned by the compiler
from the batch sharding, and the embedding engine does its own collectives
under `jax.shard_map`. (`jax.make_mesh` now defaults to explicit axes, which
would type every array's sharding; we do not need that here.)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = 'data', 'model'  # the mesh's axes
BATCH_AXES = (DATA, MODEL)  # batches are split over both


def resolve_axis_sizes(data: int, model: int, num_devices: int,
                       *, path: str = 'config.mesh') -> tuple[int, int]:
  """Resolves the mesh's axis sizes.

  One size may be -1. It takes the rest of the devices.

  Args:
    data: the 'data' axis size, or -1.
    model: the 'model' axis size, or -1.
    num_devices: the number of devices.
    path: the config path to name in messages.

  Returns:
    The data and model sizes. Their product is `num_devices`.

  Raises:
    ValueError: a size is neither positive nor -1, both are -1, or the
      devices do not split into these axes.
  """
  sizes = {'data': int(data), 'model': int(model)}
  unknown = [k for k, v in sizes.items() if v == -1]
  for k, v in sizes.items():
    if v != -1 and v <= 0:
      raise ValueError(f'{path}.{k} ({v}) must be positive or -1.')
  if len(unknown) > 1:
    raise ValueError(
        f'{path}: at most one axis may be -1, got data={data}, model={model}.')
  if unknown:
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if num_devices % known:
      raise ValueError(
          f'{path}: {num_devices} devices do not split into axes with'
          f' data={data}, model={model}.')
    sizes[unknown[0]] = num_devices // known
  if sizes['data'] * sizes['model'] != num_devices:
    raise ValueError(
        f'{path}: data ({sizes["data"]}) x model ({sizes["model"]}) must equal'
        f' the number of devices ({num_devices}).')
  return sizes['data'], sizes['model']


def create_mesh(data: int = 1, model: int = -1,
                devices: Any = None) -> Mesh:
  """Creates a ('data', 'model') mesh over `devices`.

  Args:
    data: the 'data' axis size, or -1.
    model: the 'model' axis size, or -1.
    devices: the devices. Default: all devices.

  Returns:
    The mesh, with Auto axes.

  Raises:
    ValueError: the devices do not split into these axes.
  """
  devices = jax.devices() if devices is None else list(devices)
  d, m = resolve_axis_sizes(data, model, len(devices))
  return jax.make_mesh((d, m), (DATA, MODEL),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Splits the leading batch dim over every device.

  Args:
    mesh: the mesh.
    ndim: the array's number of dims.

  Returns:
    The sharding.
  """
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts `jax.distributed` when asked to or when a cluster is detected.

  Values come from the arguments, else from the environment:
  `DLRM_COORDINATOR_ADDRESS`, `DLRM_NUM_PROCESSES` and `DLRM_PROCESS_ID`.
  With none set, JAX's own cluster detection runs when `DLRM_DISTRIBUTED=1`,
  as on TPU VMs, or when a SLURM or Open MPI job is found. Otherwise a single
  process does nothing.

  Args:
    coordinator_address: the coordinator's host:port.
    num_processes: the number of processes.
    process_id: this process's id.

  Raises:
    ValueError: a coordinator address without the process count and id.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      'DLRM_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('DLRM_NUM_PROCESSES'):
    num_processes = int(env['DLRM_NUM_PROCESSES'])
  if process_id is None and env.get('DLRM_PROCESS_ID'):
    process_id = int(env['DLRM_PROCESS_ID'])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
          'a coordinator address was given without the process count and id'
          ' (--num_processes/--process_id or DLRM_NUM_PROCESSES/'
          'DLRM_PROCESS_ID).')
    if process_id == 0:
      logging.info('jax.distributed.initialize(%s, %d processes)',
                   coordinator_address, num_processes)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  cluster_env = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE')
  if env.get('DLRM_DISTRIBUTED') == '1' or (
      any(k in env for k in cluster_env) and env.get('DLRM_DISTRIBUTED') != '0'):
    logging.info('cluster environment detected; jax.distributed.initialize()')
    jax.distributed.initialize()
