"""The tabular source (`dlrm_jax.data.table`) against plain references.

Formats against each other, Criteo's files against the Criteo reader,
bags, crosses and side tables against a Python loop, two processes against
one, a resumed stream against an uninterrupted one, and each bad input.
"""

import os
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl.testing import absltest
from ml_collections import config_dict

from configs import avazu
from configs import criteo as criteo_config
from dlrm_jax.config import build
from dlrm_jax.data import criteo
from dlrm_jax.data import inputs
from dlrm_jax.data import table
from tests import shared_data

M32 = 0xFFFFFFFF


def py_fnv(text: str) -> int:
  """32-bit FNV-1a, one byte at a time."""
  h = 2166136261
  for b in text.encode('utf-8'):
    h = ((h ^ b) * 16777619) & M32
  return h


def py_mix32(z: int) -> int:
  """MurmurHash3's finalizer, in Python ints."""
  z = ((z ^ (z >> 16)) * 0x85EBCA6B) & M32
  z = ((z ^ (z >> 13)) * 0xC2B2AE35) & M32
  return z ^ (z >> 16)


def py_hashed_row(value: int | None, rows: int) -> int:
  """A hashed id feature's row of an encoded value (None: missing)."""
  return 0 if value is None else 1 + py_mix32(value) % (rows - 1)


def _config(columns: dict[str, dict], sparse, dense=(), **table_fields):
  """A table config over the given features."""
  config = criteo_config.get_config('tiny')
  config.data.source = 'table'
  config.data.table = criteo_config.table_config()
  config.data.table.update(table_fields)
  config.features = config_dict.ConfigDict(
      {k: config_dict.ConfigDict(v) for k, v in columns.items()})
  config.model.feature_groups = config_dict.ConfigDict(
      dict(dense=list(dense), sparse=list(sparse)))
  if not dense:
    config.model.dense_mlp = None
  config.embedding.tables = config_dict.ConfigDict()
  config.embedding.sharding_overrides = config_dict.ConfigDict()
  return config


def _read_all(source) -> dict[str, np.ndarray]:
  chunks = list(source.iter_rows())
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _avazu_spec(path, **table_fields):
  config = avazu.get_config()
  config.data.train_path = path
  config.data.table.update(table_fields)
  return build.run_spec(config)


class FormatsTest(absltest.TestCase):
  """The same rows as CSV, TSV without a header and Parquet."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    src = shared_data.shared_dir()
    path = src and os.path.join(src, 'data', 'avazu',
                                'avazu_train_head_9999.csv')
    cls.avazu = path if path and os.path.isfile(path) else None

  def setUp(self):
    super().setUp()
    if self.avazu is None:
      shared_data.avazu_file(self)  # skips, saying where it looked

  def test_csv_tsv_and_parquet_give_identical_batches(self):
    rows = pa_csv.read_csv(self.avazu).slice(0, 700)
    csv_path = os.path.join(self.tmp, 'a.csv')
    tsv_path = os.path.join(self.tmp, 'a.tsv')
    pq_path = os.path.join(self.tmp, 'a.parquet')
    pa_csv.write_csv(rows, csv_path)
    pa_csv.write_csv(rows, tsv_path, pa_csv.WriteOptions(
        include_header=False, delimiter='\t', quoting_style='none'))
    pq.write_table(rows, pq_path, row_group_size=256)  # typed columns
    spec = _avazu_spec(csv_path)
    want = _read_all(table.TableSource([csv_path], spec.data.table))
    tsv = _avazu_spec(tsv_path, header=False,
                      columns=list(rows.column_names))
    got_tsv = _read_all(table.TableSource([tsv_path], tsv.data.table))
    got_pq = _read_all(table.TableSource([pq_path], spec.data.table))
    self.assertLen(want['label'], 700)
    for got in (got_tsv, got_pq):
      self.assertEqual(sorted(got), sorted(want))
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # And the raw text of the source file gives the same ids too.
    whole = _read_all(table.TableSource([self.avazu], spec.data.table,
                                        stop=700))
    for k in want:
      np.testing.assert_array_equal(whole[k], want[k], err_msg=k)
    # String hashes are FNV-1a of the text, as a Python loop computes them.
    texts = rows.column('site_id').to_pylist()
    self.assertEqual(want['site_id'].tolist(), [py_fnv(t) for t in texts])
    ints = rows.column('C14').to_pylist()  # hashed as their decimal text
    self.assertEqual(want['C14'].tolist(), [py_fnv(str(v)) for v in ints])

  def test_resume_in_the_middle_of_a_file_equals_an_uninterrupted_run(self):
    config = avazu.get_config()
    config.data.train_path = self.avazu
    config.data.shuffle_buffer = 1000
    config.data.chunk_rows = 300
    config.batch_size = 256
    data = inputs.make_data(build.run_spec(config))
    straight = data.train.iterate(0)
    want = [next(straight) for _ in range(40)]  # over 1 epoch (35 steps)
    resumed = data.train.iterate(17)
    for k in range(17, 40):
      position, batch = next(resumed)
      self.assertEqual(position, want[k][0])
      for key in batch:
        np.testing.assert_array_equal(batch[key], want[k][1][key])

  def test_two_processes_read_the_rows_of_one(self):
    config = avazu.get_config()
    config.data.train_path = self.avazu
    config.batch_size = 500
    spec = build.run_spec(config)
    one = inputs.make_data(spec)
    barrier = threading.Barrier(2)
    sent = [None, None]
    results = [None, None]

    def run(p):
      def gather(values):  # process_allgather, between two threads
        sent[p] = list(values)
        barrier.wait()
        out = np.array(sent, np.int64)
        barrier.wait()
        return out
      results[p] = inputs.make_data(spec, process_index=p, process_count=2,
                                    gather=gather)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    self.assertIsNotNone(results[0])
    self.assertIsNotNone(results[1])

    def rows_of(batches):
      return [tuple(r) for b in batches for r in b['ids'].tolist()]

    def train_rows(data, steps):
      it = data.train.iterate(0)
      return rows_of(next(it)[1] for _ in range(steps))

    def eval_rows(data):
      src = data.eval.source
      return rows_of(data.eval.make_batch(c) for c in src.iter_rows())

    steps = results[0].train.batches_per_epoch
    self.assertEqual(steps, results[1].train.batches_per_epoch)
    all_rows = rows_of([build_batch(spec, self.avazu)])
    evals = eval_rows(results[0]) + eval_rows(results[1])
    # Process p's train rows are the head of its share, in file order
    # (no shuffle): the shares laid end to end cover the train part.
    first = train_rows(results[0], steps)
    second = train_rows(results[1], steps)
    self.assertEqual(first, all_rows[:len(first)])
    start = all_rows.index(second[0], len(first))
    self.assertEqual(second, all_rows[start:start + len(second)])
    self.assertLessEqual(start + len(second), len(all_rows) - len(evals))
    self.assertEqual(evals, all_rows[len(all_rows) - len(evals):])
    one_rows = train_rows(one, one.train.batches_per_epoch)
    self.assertEqual(one_rows, all_rows[:len(one_rows)])


def build_batch(spec, path):
  """All rows of a file as one model batch, through the transform."""
  raw = _read_all(table.TableSource([path], spec.data.table))
  return inputs.make_batch_maker(spec)(raw)


def criteo_as_table(config):
  """Makes a Criteo config read Criteo's TSV files as a table of named
  columns (label, int_0..int_12, cat_0..cat_25 as hex)."""
  config.data.table.format = 'tsv'
  config.data.table.header = False
  config.data.table.columns = ['label'] + [
      f'int_{i}' for i in range(13)] + [f'cat_{i}' for i in range(26)]
  for i in range(26):
    config.features[f'cat_{i}'].value_dtype = 'hex'
  return config


class CriteoThroughTableTest(absltest.TestCase):
  """Criteo's files read as a table give the Criteo reader's batches."""

  def test_same_ids_and_dense_values(self):
    path = shared_data.criteo_file(self, 'kaggle_train_head_4000.tsv')
    config = criteo_config.get_config('default')
    criteo_spec = build.run_spec(config)
    config.data.source = 'table'
    config.data.train_path = path
    criteo_as_table(config)
    spec = build.run_spec(config)
    want = [criteo_spec.transform.apply(c) for c in criteo.read_criteo(path)]
    got = [spec.transform.apply(c) for c in table.TableSource(
        [path], spec.data.table).iter_rows()]
    for key in ('label', 'dense', 'ids'):
      w = np.concatenate([b[key] for b in want])
      g = np.concatenate([b[key] for b in got])
      self.assertEqual(w.shape, g.shape)
      np.testing.assert_array_equal(g, w, err_msg=key)
    self.assertLen(np.concatenate([b['label'] for b in got]), 4000)


class FeaturesTest(absltest.TestCase):
  """Bags, crosses, vocabularies and side tables against a Python loop."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.main = os.path.join(self.tmp, 'log.csv')
    with open(self.main, 'w') as f:
      f.write('label,user,tags,city,rating\n'
              '1,u1,a|b,x,5\n'
              '0,u2,,y,1\n'
              '1,u3,c|a|d,,4\n'
              '0,u1,b,x,3\n')
    self.side = os.path.join(self.tmp, 'users.txt')
    with open(self.side, 'w') as f:  # '|'-separated, no header
      f.write('u1|30|us|1|0\nu3|40|fr|0|1\n')
    self.features = dict(
        tags=dict(type='id', input='tags', embedding_dim=4,
                  hash_bucket_size=50, separator='|', max_ids=3),
        cross=dict(type='combo', inputs=['user', 'city'], embedding_dim=4,
                   hash_bucket_size=97),
        country=dict(type='id', input='country', embedding_dim=4,
                     hash_bucket_size=13),
        city=dict(type='id', input='city', embedding_dim=4,
                  vocab_list=['?', 'x', 'y'], default_bucketize_value=0),
        flags=dict(type='id', input='flags', embedding_dim=4,
                   num_buckets=3, flag_columns=['f1', 'f2'], max_ids=2),
        age=dict(type='raw', input='age', normalizer='none'),
    )
    self.sides = config_dict.ConfigDict(dict(users=dict(
        path=self.side, key='user', join_on='user', format='csv',
        delimiter='|', header=False,
        columns=['user', 'age', 'country', 'f1', 'f2'])))

  def _spec(self, **table_fields):
    config = _config(self.features, ['tags', 'cross', 'country', 'city',
                                     'flags'], dense=['age'], **table_fields)
    config.model.dense_mlp = criteo_config.mlp([4])
    config.data.train_path = self.main
    config.data.table.side_tables = self.sides
    return build.run_spec(config)

  def test_against_a_python_loop(self):
    spec = self._spec()
    raw = _read_all(table.TableSource([self.main], spec.data.table))
    batch = spec.transform.apply(raw)
    side = {'u1': ('30', 'us', (1, 0)), 'u3': ('40', 'fr', (0, 1))}
    lines = open(self.main).read().splitlines()[1:]
    want_ids, want_dense, want_label = [], [], []
    for line in lines:
      label, user, tags, city, _ = line.split(',')
      row = []
      bag = [py_hashed_row(py_fnv(t), 50) for t in tags.split('|') if t]
      row += bag + [-1] * (3 - len(bag))
      if city:
        h = 0
        for v in (py_fnv(user), py_fnv(city)):
          h = py_mix32((h * 0x9E3779B1 + v + 1) & M32)
        row.append(py_hashed_row(h, 97))
      else:
        row.append(0)
      age, country, flags = side.get(user, ('0', None, (0, 0)))
      row.append(py_hashed_row(country and py_fnv(country), 13))
      row.append(['?', 'x', 'y'].index(city) if city in ('x', 'y') else 0)
      on = [1 + i % 2 for i, f in enumerate(flags) if f]  # 1 + idx % (3-1)
      row += on + [-1] * (2 - len(on))
      want_ids.append(row)
      want_dense.append([float(age)])
      want_label.append(float(label))
    np.testing.assert_array_equal(batch['ids'], np.array(want_ids))
    np.testing.assert_array_equal(batch['dense'], np.array(want_dense))
    np.testing.assert_array_equal(batch['label'], np.array(want_label))

  def test_label_rule(self):
    spec = self._spec(label='rating', label_rule='>= 4')
    raw = _read_all(table.TableSource([self.main], spec.data.table))
    np.testing.assert_array_equal(raw['label'], [1, 0, 1, 0])


class ConfigsTrainTest(absltest.TestCase):
  """configs/avazu.py and configs/movielens.py learn from their samples."""

  def _train(self, config, path):
    from dlrm_jax.train import loop as train_loop  # pylint: disable=g-import-not-at-top
    config.data.train_path = path
    config.num_train_steps = 60
    config.min_train_steps = 0
    config.early_stopping.patience = 0
    config.eval_every_steps = 60
    config.batch_size = 256
    summary = train_loop.train_and_evaluate(
        config, self.create_tempdir().full_path)
    return summary['eval']['auc']

  def test_movielens_learns(self):
    from configs import movielens  # pylint: disable=g-import-not-at-top
    folder = shared_data.movielens_dir(self)
    auc = self._train(movielens.get_config(folder),
                      os.path.join(folder, 'u.data.first20000'))
    self.assertGreater(auc, 0.65)  # rating >= 4 from ids, genres, users

  def test_avazu_learns(self):
    auc = self._train(avazu.get_config(), shared_data.avazu_file(self))
    self.assertGreater(auc, 0.6)


class BadInputTest(absltest.TestCase):
  """Each bad input: one line naming the file, line (row) and column."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.features = dict(
        user=dict(type='id', input='user', embedding_dim=4, num_buckets=10),
        price=dict(type='raw', input='price', normalizer='none'))

  def _write(self, text, name='log.csv'):
    path = os.path.join(self.tmp, name)
    with open(path, 'w') as f:
      f.write(text)
    return path

  def _source(self, path, bad_lines='error', features=None):
    config = _config(features or self.features, ['user'], dense=['price'])
    config.model.dense_mlp = criteo_config.mlp([4])
    config.data.train_path = path
    spec = build.run_spec(config)
    return table.TableSource([path], spec.data.table, bad_lines=bad_lines)

  def test_wrong_number_of_fields(self):
    path = self._write('label,user,price\n1,3,2.5\n0,4\n1,5,1.0\n')
    with self.assertRaisesRegex(criteo.MalformedLineError,
                                rf'^{path}:3: has 2 fields, not 3$'):
      _read_all(self._source(path))
    src = self._source(path, bad_lines='skip')
    rows = _read_all(src)
    np.testing.assert_array_equal(rows['user'], [3, 5])
    self.assertEqual(src.report.count, 1)
    self.assertIn(f'{path}:3: has 2 fields', src.report.examples[0])

  def test_value_that_does_not_parse(self):
    path = self._write('label,user,price\n1,3,2.5\n0,4,1.5\n1,x7,1.0\n'
                       '1,2,abc\n')
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        rf"^{path}:4: column 'user' is not a decimal integer$"):
      _read_all(self._source(path))
    src = self._source(path, bad_lines='skip')
    rows = _read_all(src)
    np.testing.assert_array_equal(rows['user'], [3, 4])
    self.assertEqual(src.report.count, 2)
    self.assertIn(f"{path}:5: column 'price' is not a number",
                  src.report.examples[1])

  def test_label_outside_its_rule(self):
    path = self._write('label,user,price\n1,3,2.5\n2,4,1.5\n')
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        rf"^{path}:3: column 'label' is not a label, 0 or 1$"):
      _read_all(self._source(path))

  def test_missing_column(self):
    path = self._write('label,uid,price\n1,3,2.5\n')
    with self.assertRaisesRegex(
        ValueError, r"config.features.user: column 'user' is not in "
        + path + r' \(its columns: label, uid, price\)'):
      self._source(path)

  def test_parquet_column_of_the_wrong_type(self):
    path = os.path.join(self.tmp, 'log.parquet')
    pq.write_table(pa.table({'label': [1, 0], 'user': [1.5, 2.5],
                             'price': [1.0, 2.0]}), path)
    with self.assertRaisesRegex(
        ValueError, rf"^{path}: column 'user' has type double, not an"
        r' integer or text\.$'):
      _read_all(self._source(path))

  def test_parquet_bad_value_names_the_row(self):
    path = os.path.join(self.tmp, 'log.parquet')
    pq.write_table(pa.table({'label': [1, 0, 1], 'user': ['1', '2', 'x'],
                             'price': [1.0, 2.0, 3.0]}), path)
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        rf"^{path}: row 3: column 'user' is not a decimal integer$"):
      _read_all(self._source(path))

  def test_bag_longer_than_max_ids(self):
    features = dict(self.features, user=dict(
        type='id', input='user', embedding_dim=4, hash_bucket_size=10,
        separator=';', max_ids=2))
    path = self._write('label,user,price\n1,a;b,2.5\n0,a;b;c,1.5\n')
    with self.assertRaisesRegex(
        criteo.MalformedLineError,
        rf"^{path}:3: column 'user' is not text, at most 2 of them"):
      _read_all(self._source(path, features=features))

  def test_config_errors_name_the_field(self):
    config = _config(self.features, ['user'], dense=['price'])
    config.model.dense_mlp = criteo_config.mlp([4])
    config.data.train_path = self._write('label,user,price\n')
    config.data.table.label_rule = 'at least 4'
    with self.assertRaisesRegex(ValueError,
                                r"config.data.table.label_rule \('at least"):
      build.run_spec(config)
    config.data.table.label_rule = ''
    config.features.user.value_dtype = 'float'
    with self.assertRaisesRegex(ValueError,
                                r'config.features.user.value_dtype'):
      build.run_spec(config)
    config.features.user.value_dtype = None
    config.data.source = 'criteo_tsv'
    with self.assertRaisesRegex(
        ValueError, r"config.features.price.input \('price'\): criteo_tsv"
        r" data has Criteo's columns only"):
      build.run_spec(config)


if __name__ == '__main__':
  absltest.main()
