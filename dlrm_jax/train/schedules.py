"""Learning-rate schedules shared by the dense and the sparse optimizers."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ('constant', 'warmup_poly', 'cosine')


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """A learning-rate schedule.

  Three kinds exist. 'constant' keeps `learning_rate`. 'warmup_poly' warms up
  linearly over `warmup_steps` and stays flat until `decay_start_step`. It then
  decays polynomially, with `power`, to `end_learning_rate` over
  `decay_steps`. That is the MLPerf and NVIDIA DLRM recipe. 'cosine' warms up
  linearly, then decays as a cosine to `end_learning_rate`, reached
  `decay_steps` after the warmup.

  Attributes:
    kind: 'constant', 'warmup_poly' or 'cosine'.
    learning_rate: the peak rate.
    warmup_steps: the warmup's length, for warmup_poly and cosine.
    decay_start_step: the first step of the decay, for warmup_poly.
    decay_steps: the decay's length.
    end_learning_rate: the rate at the end of the decay.
    power: the polynomial's power, for warmup_poly. The MLPerf recipe uses 2.
  """

  kind: str = 'constant'
  learning_rate: float = 0.01
  warmup_steps: int = 0
  decay_start_step: int = 0
  decay_steps: int = 0
  end_learning_rate: float = 0.0
  power: float = 2.0


def build(spec: ScheduleSpec) -> optax.Schedule:
  """Builds the optax schedule of a spec.

  Args:
    spec: the schedule.

  Returns:
    A function from the step to the rate.
  """
  lr = spec.learning_rate
  if spec.kind == 'constant':
    return optax.constant_schedule(lr)
  if spec.kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if spec.warmup_steps else lr,
        peak_value=lr,
        warmup_steps=spec.warmup_steps,
        decay_steps=spec.warmup_steps + spec.decay_steps,
        end_value=spec.end_learning_rate,
    )
  # warmup_poly
  pieces, boundaries = [], []
  if spec.warmup_steps:
    pieces.append(optax.linear_schedule(0.0, lr, spec.warmup_steps))
    boundaries.append(spec.warmup_steps)
  start = max(spec.decay_start_step, spec.warmup_steps)
  if start > spec.warmup_steps:
    pieces.append(optax.constant_schedule(lr))
    boundaries.append(start)
  if spec.decay_steps:
    pieces.append(optax.polynomial_schedule(
        lr, spec.end_learning_rate, spec.power, spec.decay_steps))
  else:
    pieces.append(optax.constant_schedule(lr))
  if len(pieces) == 1:
    return pieces[0]
  return optax.join_schedules(pieces, boundaries)
