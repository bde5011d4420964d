"""Input pipeline and preprocessing throughput, against the training step.

  python -m benchmarks.input_pipeline                  # from the repo root
  python -m benchmarks.input_pipeline --rows=1000000,4000000 --tfds_rows=500000

1. Writes Criteo-format text files of the given sizes (rows of the synthetic
   generator, in Kaggle's layout) to --work_dir.
2. Preprocesses each (modulo ids) in a fresh process: rows/s and the peak
   resident memory of any one process, which must not grow with the file.
3. Reads global batches of --batch rows through the grain pipeline, shuffled,
   from the binary format and from the TFDS ArrayRecord dataset (prepared
   from the --tfds_rows file), with the default config's feature transform:
   examples/s.
4. Streams the largest text file through the criteo_tsv training iterator
   (parse, shuffle window, transform): examples/s.
5. Writes the same rows as a CSV with a header and as Parquet (--table) and
   streams each through the tabular source (`config.data.source='table'`,
   the default config's features reading the columns `int_0..int_12` as
   raw and `cat_0..cat_25` as hex ids): rows/s beside the Criteo reader's,
   and `input_over_step_table_<format>`. Also pyarrow's CSV reader alone on
   the CSV, opened as the source opens it (`TableSource.text_reader`): the
   floor of the CSV path.
6. Times the default config's training step at the same batch size.
Then `slowest_source=<name>`, the source of least input over step of all
measured (binary, TFDS, the tables). The last line is
`input_over_step=<slower input / training step>` of the random-access
sources (binary, TFDS).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np

from dlrm_jax import cli
from dlrm_jax.data import synthetic

_ROWS = flags.DEFINE_list('rows', ['1000000', '3000000'],
                          'Rows of the generated text files.')
_TFDS_ROWS = flags.DEFINE_integer('tfds_rows', 300_000,
                                  'Rows of the TFDS dataset prepared.')
_BATCH = flags.DEFINE_integer('batch', 8192, 'Global batch size.')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches read per source.')
_WORK = flags.DEFINE_string('work_dir', '/tmp/dlrm_input_bench',
                            'Scratch directory (big files).')
_WORKERS = flags.DEFINE_integer('workers', None, 'Preprocessing processes.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: one measurement.')
_TABLE = flags.DEFINE_bool('table', True,
                           'Measure the tabular source (CSV and Parquet).')
_TFDS = flags.DEFINE_bool('tfds', True, 'Measure TFDS when installed.')
_TFDS_COMPRESSION = flags.DEFINE_string(
    'tfds_compression', None,
    "The TFDS shards' compression (e.g. 'snappy'); default: the builder's.")


def criteo_table_config(path: str, batch: int):
  """The default config reading Criteo's rows as a table by column name.

  Args:
    path: a CSV (with a header) or Parquet file with the columns label,
      int_0..int_12 and cat_0..cat_25.
    batch: the batch size.

  Returns:
    The config: `data.source='table'`, raw features `int_<i>`, hex id
    features `cat_<i>`.
  """
  from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
  config = criteo_config.get_config()
  config.data.source = 'table'
  config.data.table = criteo_config.table_config(label='label')
  for i in range(criteo_config.NUM_CAT):
    config.features[f'cat_{i}'].input = f'cat_{i}'
    config.features[f'cat_{i}'].value_dtype = 'hex'
  for name in config.model.feature_groups.dense:
    config.features[name].input = name
  config.data.train_path = path
  config.data.eval_fraction = 0.0
  config.data.shuffle_buffer = 4 * batch
  config.batch_size = batch
  return config


def write_tables(text: str, out_dir: str) -> dict[str, str]:
  """Writes Criteo text rows as a CSV with a header and as Parquet.

  Args:
    text: a Criteo TSV (label, 13 ints, 26 hex values, no header).
    out_dir: where to write.

  Returns:
    'csv' and 'parquet' -> the file.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pa_csv  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  names = (['label'] + [f'int_{i}' for i in range(13)] +
           [f'cat_{i}' for i in range(26)])
  stem = os.path.join(out_dir, os.path.basename(text).rsplit('.', 1)[0])
  paths = {'csv': stem + '.csv', 'parquet': stem + '.parquet'}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  types = {n: pa.string() for n in names}
  types.update({n: pa.int64() for n in names[:14]})
  t = pa_csv.read_csv(
      text, read_options=pa_csv.ReadOptions(column_names=names),
      parse_options=pa_csv.ParseOptions(delimiter='\t'),
      convert_options=pa_csv.ConvertOptions(
          column_types=types, strings_can_be_null=True, null_values=['']))
  pa_csv.write_csv(t, paths['csv'] + '.tmp', pa_csv.WriteOptions(
      quoting_style='none'))
  os.replace(paths['csv'] + '.tmp', paths['csv'])
  pq.write_table(t, paths['parquet'] + '.tmp', row_group_size=1 << 17)
  os.replace(paths['parquet'] + '.tmp', paths['parquet'])
  return paths


def peak_rss_gb() -> float:
  return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6


def time_batches(it, task: dict) -> dict:
  """Examples/s of `task['batches']` batches of `it`, after 3 untimed."""
  for _ in range(3):
    next(it)
  t0 = time.time()
  for _ in range(task['batches']):
    b = next(it)
  dt = time.time() - t0
  assert b['ids'].shape == (task['batch'], 26)
  return {'examples_per_s': task['batch'] * task['batches'] / dt}


def child(task: dict) -> dict:
  kind = task['kind']
  if kind == 'preprocess':
    from dlrm_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    meta = preprocess.run([task['input']], task['output'], workers=task[
        'workers'], num_buckets=task['buckets'], progress=False)
    rows = sum(p['rows'] for p in meta.splits['train'])
    return {'rows': rows, 'seconds': time.time() - t0,
            'peak_rss_gb': peak_rss_gb()}
  if kind == 'tfds_prepare':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import tfds_criteo  # pylint: disable=g-import-not-at-top,unused-import
    os.makedirs(task['manual'], exist_ok=True)
    target = os.path.join(task['manual'], 'train.txt')
    if not os.path.exists(target):
      os.symlink(task['input'], target)
    t0 = time.time()
    builder = tfds.builder('criteo_kaggle', data_dir=task['data_dir'],
                           compression=task['compression'])
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=task['manual']))
    return {'seconds': time.time() - t0}
  if kind in ('read_binary', 'read_tfds'):
    from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
    from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import binary, inputs, loader  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config()
    if kind == 'read_binary':
      config.data.source, config.data.binary_dir = 'binary', task['dir']
      config = config_lib.resolve_data(config)
      source = binary.BinarySource(task['dir'], 'train')
    else:
      from dlrm_jax.data import tfds_criteo  # pylint: disable=g-import-not-at-top
      source = tfds_criteo.TfdsCriteoSource('criteo_kaggle', 'train',
                                            task['dir'])
    data = loader.GrainTrainData(
        inputs.RandomAccessRows(source), inputs.make_batch_maker(config),
        task['batch'], num_batches=1 << 30, seed=0, shuffle=True,
        num_threads=2, prefetch=4)
    return time_batches(data.iterator(), task)
  if kind == 'stream_tsv':
    from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import inputs  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config()
    config.data.train_path = task['input']
    config.data.eval_fraction = 0.0
    config.data.shuffle_buffer = 4 * task['batch']
    config.batch_size = task['batch']
    it = inputs.make_data(config).train.iterator(prefetch=2)
    try:
      return time_batches(it, task)
    finally:
      it.close()
  if kind == 'stream_table':
    from dlrm_jax.data import inputs  # pylint: disable=g-import-not-at-top
    config = criteo_table_config(task['input'], task['batch'])
    it = inputs.make_data(config).train.iterator(prefetch=2)
    try:
      return time_batches(it, task)
    finally:
      it.close()
  if kind == 'parse_csv':
    from dlrm_jax.config import build  # pylint: disable=g-import-not-at-top
    from dlrm_jax.data import table  # pylint: disable=g-import-not-at-top
    config = criteo_table_config(task['input'], task['batch'])
    src = table.TableSource([task['input']], build.run_spec(config).data.table,
                            stop=0)
    t0 = time.time()
    rows = sum(b.num_rows for b in src.text_reader(src.pieces[0]))
    return {'rows_per_s': rows / (time.time() - t0)}
  if kind == 'train_step':
    import jax  # pylint: disable=g-import-not-at-top
    from configs import criteo as criteo_config  # pylint: disable=g-import-not-at-top
    from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    config = criteo_config.get_config()
    config.batch_size = task['batch']
    config.eval_batch_size = task['batch']
    trainer = trainer_lib.Trainer(config)
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    rows = trainer.spec.table_rows
    b = task['batch']
    batch = trainer.put_batch({
        'dense': rng.normal(size=(b, 13)).astype(np.float32),
        'ids': np.stack([rng.integers(0, r, b) for r in rows], 1).astype(
            np.int32),
        'label': (rng.random(b) < 0.25).astype(np.float32)})
    acc = trainer.zero_metrics()
    for _ in range(3):
      state, acc = trainer.train_step(state, batch, acc)
    jax.block_until_ready(acc)
    best = float('inf')
    for _ in range(3):
      t0 = time.time()
      for _ in range(10):
        state, acc = trainer.train_step(state, batch, acc)
      jax.block_until_ready(acc)
      best = min(best, (time.time() - t0) / 10)
    return {'examples_per_s': b / best}
  raise ValueError(kind)


def run_child(task: dict) -> dict:
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline',
       '--child=' + json.dumps(task)], capture_output=True, text=True,
      check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'{task["kind"]} failed:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main(argv):
  del argv
  if _CHILD.value:
    print('RESULT ' + json.dumps(child(json.loads(_CHILD.value))), flush=True)
    return
  os.makedirs(_WORK.value, exist_ok=True)
  workers = _WORKERS.value or os.cpu_count()
  sizes = [int(float(r)) for r in _ROWS.value]
  print(f'preprocessing (modulo ids, {workers} workers):')
  print(f'{"rows":>12} {"text GB":>8} {"rows/s":>10} {"peak RSS GB":>12}')
  last_bin = None
  for n in sizes:
    text = os.path.join(_WORK.value, f'criteo_{n}.txt')
    if not os.path.exists(text):
      synthetic.write_criteo_tsv(text, n)
    out = os.path.join(_WORK.value, f'bin_{n}')
    shutil.rmtree(out, ignore_errors=True)
    res = run_child({'kind': 'preprocess', 'input': text, 'output': out,
                     'workers': workers, 'buckets': 100_000})
    print(f'{n:>12,} {os.path.getsize(text) / 1e9:>8.2f} '
          f'{res["rows"] / res["seconds"]:>10,.0f} '
          f'{res["peak_rss_gb"]:>12.2f}', flush=True)
    last_bin = out
  text_last = text
  stream = run_child({'kind': 'stream_tsv', 'input': text,
                      'batch': _BATCH.value, 'batches': _BATCHES.value})
  rates = {}
  res = run_child({'kind': 'read_binary', 'dir': last_bin,
                   'batch': _BATCH.value, 'batches': _BATCHES.value})
  rates['binary'] = res['examples_per_s']
  try:
    from dlrm_jax.data import tfds_criteo  # pylint: disable=g-import-not-at-top
    have_tfds = True
  except ImportError:
    have_tfds = False
  if have_tfds and _TFDS.value:
    text = os.path.join(_WORK.value, f'criteo_{_TFDS_ROWS.value}.txt')
    if not os.path.exists(text):
      synthetic.write_criteo_tsv(text, _TFDS_ROWS.value, seed=1)
    tfds_dir = os.path.join(_WORK.value, f'tfds_{_TFDS_ROWS.value}')
    shutil.rmtree(tfds_dir, ignore_errors=True)  # time a full preparation
    compression = (_TFDS_COMPRESSION.value or
                   tfds_criteo.DEFAULT_COMPRESSION)
    prep = run_child({'kind': 'tfds_prepare', 'input': text,
                      'manual': os.path.join(_WORK.value, 'manual'),
                      'data_dir': tfds_dir, 'compression': compression})
    print(f'TFDS prepare of {_TFDS_ROWS.value:,} rows ({compression}): '
          f'{_TFDS_ROWS.value / prep["seconds"]:,.0f} rows/s')
    res = run_child({'kind': 'read_tfds', 'dir': tfds_dir,
                     'batch': _BATCH.value, 'batches': _BATCHES.value})
    rates['tfds'] = res['examples_per_s']
  tables = {}
  if _TABLE.value:
    paths = write_tables(text_last, _WORK.value)
    for fmt, path in paths.items():
      tables[fmt] = run_child({'kind': 'stream_table', 'input': path,
                               'batch': _BATCH.value,
                               'batches': _BATCHES.value})['examples_per_s']
    csv_parse = run_child({'kind': 'parse_csv', 'input': paths['csv'],
                           'batch': _BATCH.value})['rows_per_s']
  step = run_child({'kind': 'train_step', 'batch': _BATCH.value})
  print(f'input pipeline, batches of {_BATCH.value}, shuffled, default'
        ' config transform:')
  for k, v in rates.items():
    print(f'  {k:8s} {v:>12,.0f} examples/s')
  print(f'  {"text":8s} {stream["examples_per_s"]:>12,.0f} examples/s'
        ' (criteo_tsv streamed in order, shuffle window of 4 batches; not'
        ' in input_over_step)')
  for fmt, v in tables.items():
    print(f'  {"table " + fmt:8s} {v:>12,.0f} examples/s (tabular source on'
          f' the same rows, streamed in order, shuffle window of 4 batches;'
          f' {v / stream["examples_per_s"]:.2f}x the criteo_tsv reader)')
  if tables:
    print(f'  {"csv parse":8s} {csv_parse:>12,.0f} rows/s (pyarrow\'s CSV reader'
          ' alone, as the tabular source opens it: string columns, one'
          ' thread; the floor of table csv)')
  print(f'training step (default config, batch {_BATCH.value}): '
        f'{step["examples_per_s"]:,.0f} examples/s')
  for fmt, v in tables.items():
    print(f'input_over_step_table_{fmt}={v / step["examples_per_s"]:.2f}')
  every = dict(rates, **{f'table_{fmt}': v for fmt, v in tables.items()})
  slowest = min(every, key=every.get)
  print(f'slowest_source={slowest} (input_over_step'
        f' {every[slowest] / step["examples_per_s"]:.2f})')
  print(f'input_over_step={min(rates.values()) / step["examples_per_s"]:.2f}')


if __name__ == '__main__':
  cli.run_app(main)
