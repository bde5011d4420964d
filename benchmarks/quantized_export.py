"""AUC and table bytes of float32, fp16 and int8 exports of one model.

  python -m benchmarks.quantized_export                # tiny model, shared sample
  python -m benchmarks.quantized_export --workdir=runs/a --config=configs/criteo.py \
      --eval_file=/data/criteo/day_23_head.tsv

(run from the repository root). Without --workdir it trains the `tiny`
config on the shared Criteo sample `kaggle_train_head_4000.tsv` (a few
seconds). It exports the model three times (`--quantize` none, fp16, int8),
scores the labeled --eval_file (default: the shared
`kaggle_train_random_1000.tsv`) with each export, and prints AUC, its
difference from float32, the largest score difference and the bytes of
`tables/`. The last line is `int8_auc_minus_float32=<difference>`.
"""

import os
import tempfile

from absl import app
from absl import flags
import numpy as np

from dlrm_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (default:'
                               ' train the tiny config on the shared sample).')
_CONFIG = flags.DEFINE_string('config', 'configs/criteo.py',
                              'With --workdir: its config file[:variant].')
_EVAL = flags.DEFINE_string('eval_file', None, 'Labeled Criteo text rows.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Training steps without --workdir.')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shared(name):
  from tests import shared_data  # pylint: disable=g-import-not-at-top
  d = shared_data.shared_dir()
  if d is None:
    raise app.UsageError('the shared Criteo samples are not found; pass'
                         ' --workdir and --eval_file.')
  return os.path.join(d, 'data', 'criteo', name)


def _load_config(spec):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from dlrm_jax.serving import runtime as export_runtime  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.serving import offline as inference  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.train import metrics  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.train import loop as train_loop  # pylint: disable=g-import-not-at-top,g-multiple-import
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top,g-multiple-import
  eval_file = _EVAL.value or _shared('kaggle_train_random_1000.tsv')
  with tempfile.TemporaryDirectory(prefix='dlrm_quant_bench_') as tmp:
    if _WORKDIR.value:
      config, workdir = _load_config(_CONFIG.value), _WORKDIR.value
    else:
      config = _load_config(os.path.join(_ROOT, 'configs', 'criteo.py:tiny'))
      config.data.train_path = _shared('kaggle_train_head_4000.tsv')
      config.data.eval_path = eval_file
      config.num_train_steps = _STEPS.value
      config.eval_every_steps = config.checkpoint_every_steps = _STEPS.value
      workdir = os.path.join(tmp, 'run')
      mesh = jax.make_mesh((1, 1), ('data', 'model'),
                           devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
      train_loop.train_and_evaluate(config, workdir,
                                    trainer_lib.Trainer(config, mesh=mesh))
    model = inference.load(config, workdir)
    lines = open(eval_file).read().splitlines()
    labels = np.array([int(l.split('\t', 1)[0]) for l in lines])
    rows = export_runtime.parse_rows(lines)
    scores, sizes = {}, {}
    for q in ('none', 'fp16', 'int8'):
      out = os.path.join(tmp, q)
      inference.export(model, out, quantize=None if q == 'none' else q)
      tdir = os.path.join(out, 'tables')
      sizes[q] = sum(os.path.getsize(os.path.join(tdir, f))
                     for f in os.listdir(tdir))
      scores[q] = export_runtime.load_export(out).scores(
          rows['int'], rows['cat'], rows['cat_present'])
    base = metrics.roc_auc(scores['none'], labels)
    print(f'{len(lines)} labeled rows of {eval_file}')
    for q in ('none', 'fp16', 'int8'):
      auc = metrics.roc_auc(scores[q], labels)
      print(f'{q:5s} tables {sizes[q] / 2**20:8.2f} MiB  AUC {auc:.6f}'
            f'  minus float32 {auc - base:+.2e}  max |score diff|'
            f' {np.abs(scores[q] - scores["none"]).max():.2e}')
    print(f'int8_auc_minus_float32='
          f'{metrics.roc_auc(scores["int8"], labels) - base:+.3e}')


if __name__ == '__main__':
  cli.run_app(main)
