"""Model quality on small real data: the DLRM against hashed logistic regression.

  python -m benchmarks.quality            # from the repository root
  python -m benchmarks.quality --dataset=avazu   # or movielens

Data: the real Criteo Kaggle rows in the shared samples
(`$DLRM_SHARED_DIR/data/criteo` or `../shared/data/criteo`:
kaggle_train_head_4000.tsv and kaggle_train_random_1000.tsv, 5,000 rows),
shuffled with a fixed seed and split into train (68%), validation (12%) and
test (20%). Every choice (the small-data settings of
`configs/criteo.py:small_data`, the regression's L2 and epochs) was made on
the validation part; the test part is only scored.

  DLRM: `configs/criteo.py:small_data` trained on the train part, evaluated
    on the validation part every epoch (early stopping; the best checkpoint
    by validation AUC is kept), then that checkpoint scored on the test part.
  LR: logistic regression on the hashed one-hot of the 26 categorical values
    and of the 13 integers bucketized by floor(log(x+1)^2) (the usual Criteo
    baseline), plain NumPy, Adagrad on mini-batches with L2; its L2 and
    epoch count picked on the validation part.

`--dataset=avazu|movielens`: the tabular samples (`data/avazu`,
`data/movielens/ml-100k`), split the same way, the DLRM of
`configs/avazu.py` or `configs/movielens.py`, and the regression on the
hashed one-hot of the very ids the DLRM looks up (each feature's rows,
bags included).

Prints both models' test AUC and log loss; the last line is
`auc_over_lr=<dlrm test auc - lr test auc>` (`--seeds=0,1,2`: each split,
then the mean difference).
"""

import os
import tempfile
import time
import zlib

from absl import flags
from absl import logging
import numpy as np

from dlrm_jax import cli

_DATASET = flags.DEFINE_enum(
    'dataset', 'criteo', ['criteo', 'avazu', 'movielens'],
    'criteo: the Criteo samples (configs/criteo.py:small_data); avazu and'
    ' movielens: the tabular samples (configs/avazu.py, configs/movielens.py),'
    ' with the regression on the same hashed ids the DLRM looks up.')
_SEEDS = flags.DEFINE_list(
    'seeds', ['0'], 'Seeds of the split and the models; with several, each'
    ' split is run and the last line is the mean difference.')
_FILES = ('kaggle_train_head_4000.tsv', 'kaggle_train_random_1000.tsv')
LR_BUCKETS = 1 << 20


def shared_criteo_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.environ.get('DLRM_SHARED_DIR'),
            os.path.join(here, '..', '..', 'shared')):
    if d and os.path.isdir(os.path.join(d, 'data', 'criteo')):
      return os.path.join(os.path.abspath(d), 'data', 'criteo')
  raise SystemExit('the Criteo samples are not available: set DLRM_SHARED_DIR'
                   " to the 'shared' folder, or put it beside the checkout.")


def split_lines(seed: int) -> dict[str, list[str]]:
  lines = []
  for name in _FILES:
    with open(os.path.join(shared_criteo_dir(), name)) as f:
      lines += [l for l in f.read().splitlines() if l]
  order = np.random.default_rng(seed).permutation(len(lines))
  lines = [lines[i] for i in order]
  n = len(lines)
  n_test, n_valid = int(0.2 * n), int(0.12 * n)
  return {'test': lines[:n_test], 'valid': lines[n_test:n_test + n_valid],
          'train': lines[n_test + n_valid:]}


# ----------------------------------------------------------------------------
# Hashed logistic regression (NumPy).


def lr_features(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(`[N, 39]` hashed one-hot indices, `[N]` labels)."""
  idx = np.zeros((len(lines), 39), np.int64)
  y = np.zeros(len(lines), np.float64)
  for r, line in enumerate(lines):
    f = line.split('\t')
    y[r] = float(f[0])
    for j in range(39):
      v = f[1 + j]
      if j < 13 and v:
        x = int(v)
        v = str(int(np.log1p(x) ** 2)) if x > 0 else f'n{x}'
      idx[r, j] = zlib.crc32(f'{j}:{v}'.encode()) % LR_BUCKETS
  return idx, y


def lr_train(idx, y, l2, epochs, seed, lr=0.1, batch=32):
  """Adagrad on mini-batches of the log loss + l2/2 |w|^2 (per example)."""
  rng = np.random.default_rng(seed)
  w = np.zeros(LR_BUCKETS + 1)  # bucket LR_BUCKETS: padding, kept at 0
  acc = np.full(LR_BUCKETS + 1, 1e-6)
  b, b_acc = 0.0, 1e-6
  for _ in range(epochs):
    order = rng.permutation(len(y))
    for s in range(0, len(y), batch):
      i = order[s:s + batch]
      z = w[idx[i]].sum(axis=1) + b
      g = 1.0 / (1.0 + np.exp(-z)) - y[i]          # [n] d loss / d logit
      gw = np.zeros(LR_BUCKETS + 1)
      np.add.at(gw, idx[i].reshape(-1), np.repeat(g, idx.shape[1]) / len(i))
      touched = np.unique(idx[i])
      gw[touched] += l2 * w[touched]
      acc[touched] += gw[touched] ** 2
      w[touched] -= lr * gw[touched] / np.sqrt(acc[touched])
      gb = g.mean()
      b_acc += gb * gb
      b -= lr * gb / np.sqrt(b_acc)
      w[LR_BUCKETS] = 0.0
  return w, b


def lr_predict(model, idx):
  w, b = model
  return 1.0 / (1.0 + np.exp(-(w[idx].sum(axis=1) + b)))


def logistic_regression(parts, seed, feats=None):
  """Picks L2 and epochs on the validation part, trains on the train part,
  scores the test part. `feats` gives the parts' (indices, labels)."""
  from dlrm_jax.train import metrics  # pylint: disable=g-import-not-at-top
  if feats is None:
    feats = {k: lr_features(v) for k, v in parts.items()}
  best = None
  for l2 in (0.0, 1e-4, 1e-3, 1e-2):
    for epochs in (1, 2, 4, 8):
      model = lr_train(*feats['train'], l2, epochs, seed)
      auc = metrics.evaluate(lr_predict(model, feats['valid'][0]),
                             feats['valid'][1])['auc']
      if best is None or auc > best[0]:
        best = (auc, l2, epochs, model)
  auc_valid, l2, epochs, model = best
  test = metrics.evaluate(lr_predict(model, feats['test'][0]),
                          feats['test'][1])
  return test, {'l2': l2, 'epochs': epochs, 'valid_auc': auc_valid}


# ----------------------------------------------------------------------------
# DLRM.


def dlrm(paths, seed, workdir, overrides=None, config=None):
  """Trains `config` (default `configs/criteo.py:small_data`, with
  `overrides`, dotted config path -> value); scores its best checkpoint on
  the test part."""
  # pylint: disable=g-import-not-at-top
  from configs import criteo
  from dlrm_jax.config import build as config_lib
  from dlrm_jax.serving import offline
  from dlrm_jax.train import loop as train_loop
  from dlrm_jax.train import trainer as trainer_lib
  from dlrm_jax.data import inputs
  # pylint: enable=g-import-not-at-top
  config = config or criteo.get_config('small_data')
  config.seed = seed
  config.data.train_path = paths['train']
  config.data.eval_path = paths['valid']
  for key, value in (overrides or {}).items():
    *path, last = key.split('.')
    target = config
    for p in path:
      target = target[p]
    target[last] = value
  trainer = trainer_lib.Trainer(config_lib.resolve_data(config))
  summary = train_loop.train_and_evaluate(config, workdir, trainer)
  best = offline.load(config, workdir, checkpoint='best')
  step = best.step
  test_config = config_lib.resolve_data(config)
  test_config.data.eval_path = paths['test']
  data = inputs.make_data(test_config)
  # The kept step's state, remappers and sketch.
  test, _, _ = best.trainer.evaluate(best.state, data.eval, best.host)
  return test, {'best_step': step, 'steps_run': summary['step'],
                'valid_auc': summary['best_eval']}


# ----------------------------------------------------------------------------
# Tabular datasets: the same split, the regression on the model's own ids.

TABLES = {
    # dataset: (config module, file under data/, header line)
    'avazu': ('avazu', os.path.join('avazu', 'avazu_train_head_9999.csv'),
              True),
    'movielens': ('movielens', os.path.join('movielens', 'ml-100k',
                                            'u.data.first20000'), False),
}


def table_config(dataset: str):
  """The dataset's config (`configs/<dataset>.py`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{TABLES[dataset][0]}').get_config()


def table_ids(config, path: str) -> tuple[np.ndarray, np.ndarray]:
  """(`[N, T]` hashed one-hot indices of the model's ids, `[N]` labels).

  Feature k's id i is bucket `crc32(k:i)`; bag padding is the zero bucket
  LR_BUCKETS, whose weight stays 0."""
  # pylint: disable=g-import-not-at-top
  from dlrm_jax.config import build as config_lib
  from dlrm_jax.data import inputs
  from dlrm_jax.data import table
  # pylint: enable=g-import-not-at-top
  config.data.train_path = path
  config.data.eval_path = ''
  spec = config_lib.run_spec(config)
  make = inputs.make_batch_maker(spec)
  batches = [make(c) for c in table.TableSource(
      [path], spec.data.table).iter_rows()]
  ids = np.concatenate([b['ids'] for b in batches]).astype(np.int64)
  y = np.concatenate([b['label'] for b in batches]).astype(np.float64)
  col = np.arange(ids.shape[1], dtype=np.int64)[None, :]
  idx = (col * 1_000_003 + ids * 7919 + 12345) % LR_BUCKETS
  return np.where(ids < 0, LR_BUCKETS, idx), y


def run_table_seed(dataset: str, seed: int) -> float:
  """One split of a tabular sample: the DLRM and the regression."""
  module, rel, header = TABLES[dataset]
  path = os.path.join(os.path.dirname(shared_criteo_dir()), rel)
  with open(path) as f:
    lines = f.read().splitlines()
  head, lines = (lines[:1], lines[1:]) if header else ([], lines)
  lines = [l for l in lines if l]
  order = np.random.default_rng(seed).permutation(len(lines))
  lines = [lines[i] for i in order]
  n = len(lines)
  n_test, n_valid = int(0.2 * n), int(0.12 * n)
  parts = {'test': lines[:n_test], 'valid': lines[n_test:n_test + n_valid],
           'train': lines[n_test + n_valid:]}
  print(f'{dataset} rows: train {len(parts["train"])}, validation'
        f' {len(parts["valid"])}, test {len(parts["test"])} (seed {seed})')
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for k, v in parts.items():
      paths[k] = os.path.join(tmp, f'{k}{os.path.splitext(rel)[1]}')
      with open(paths[k], 'w') as f:
        f.write('\n'.join(head + v) + '\n')
    t = time.time()
    d_test, d_info = dlrm(paths, seed, os.path.join(tmp, 'work'),
                          config=table_config(dataset))
    d_s = time.time() - t
    t = time.time()
    feats = {k: table_ids(table_config(dataset), p) for k, p in paths.items()}
    l_test, l_info = logistic_regression(None, seed, feats=feats)
    l_s = time.time() - t
  print(f'dlrm (configs/{module}.py): test auc {d_test["auc"]:.4f}'
        f' log_loss {d_test["log_loss"]:.4f} | {d_info} | {d_s:.0f}s')
  print(f'hashed logistic regression: test auc {l_test["auc"]:.4f}'
        f' log_loss {l_test["log_loss"]:.4f} | {l_info} | {l_s:.0f}s',
        flush=True)
  return d_test['auc'] - l_test['auc']


def run_seed(seed: int) -> float:
  parts = split_lines(seed)
  print(f'real Criteo Kaggle rows: train {len(parts["train"])}, validation'
        f' {len(parts["valid"])}, test {len(parts["test"])} (seed {seed})')
  with tempfile.TemporaryDirectory() as tmp:
    paths = {}
    for k, v in parts.items():
      paths[k] = os.path.join(tmp, f'{k}.tsv')
      with open(paths[k], 'w') as f:
        f.write('\n'.join(v) + '\n')
    t = time.time()
    d_test, d_info = dlrm(paths, seed, os.path.join(tmp, 'work'))
    d_s = time.time() - t
  t = time.time()
  l_test, l_info = logistic_regression(parts, seed)
  l_s = time.time() - t
  print(f'dlrm (configs/criteo.py:small_data): test auc {d_test["auc"]:.4f}'
        f' log_loss {d_test["log_loss"]:.4f} | {d_info} | {d_s:.0f}s')
  print(f'hashed logistic regression: test auc {l_test["auc"]:.4f}'
        f' log_loss {l_test["log_loss"]:.4f} | {l_info} | {l_s:.0f}s',
        flush=True)
  return d_test['auc'] - l_test['auc']


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  if _DATASET.value == 'criteo':
    diffs = [run_seed(int(s)) for s in _SEEDS.value]
  else:
    diffs = [run_table_seed(_DATASET.value, int(s)) for s in _SEEDS.value]
  if len(diffs) > 1:
    print('per seed: ' + ', '.join(f'{d:+.4f}' for d in diffs))
  print(f'auc_over_lr={float(np.mean(diffs)):.4f}')


if __name__ == '__main__':
  cli.run_app(main)
