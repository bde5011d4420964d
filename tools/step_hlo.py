"""The compiled train step's ops, for comparing two trees of the code.

  python -m tools.step_hlo OUT.txt     # in each tree, then diff

Compiles `Trainer.train_step` of the default config (batch 2048, one
process's devices) and writes its HLO instructions, sorted, with names,
metadata and source locations stripped, so that two versions of the code
that compile to the same program give identical files. Prints the op count
and the scatters and gathers among them.
"""

import re
import sys

import numpy as np

from configs import criteo
from dlrm_jax.train import trainer as trainer_lib

_TABLES = re.compile(
    r'(function_name|file_name|file_location|parent_frame)_id=')


def step_ops(batch: int = 2048) -> list[str]:
  config = criteo.get_config()
  config.batch_size = config.eval_batch_size = batch
  trainer = trainer_lib.Trainer(config)
  num_dense = trainer.setup.model.num_dense
  host = {'ids': np.zeros((batch, len(trainer.setup.feature_specs)),
                          np.int32),
          'label': np.zeros(batch, np.float32)}
  if num_dense:
    host['dense'] = np.zeros((batch, num_dense), np.float32)
  text = trainer.train_step.lower(
      trainer.abstract_state(), trainer.put_batch(host),
      trainer.zero_metrics()).compile().as_text()
  ops = []
  for line in text.splitlines():
    if '=' not in line or _TABLES.search(line) or line.lstrip().startswith(
        ('HloModule', '"')):
      continue  # the module's source-location tables
    op = line.split('=', 1)[1]
    op = re.sub(r', metadata=\{[^}]*\}', '', op)
    op = re.sub(r',? ?stack_frame_id=\d+|origin=\{[^}]*\}', '', op)
    ops.append(re.sub(r'%[\w.\-]+', '%', op).strip())
  return sorted(ops)


def main(argv):
  ops = step_ops()
  if len(argv) > 1:
    with open(argv[1], 'w') as f:
      f.write('\n'.join(ops) + '\n')
  kinds = sum(1 for o in ops if re.search(r'\b(scatter|gather)\(', o))
  print(f'step_ops={len(ops)} scatter_gather={kinds}')


if __name__ == '__main__':
  main(sys.argv)
