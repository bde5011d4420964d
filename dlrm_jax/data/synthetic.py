"""Synthetic click logs with Criteo's shape and a hidden teacher model.

Rows look like Criteo's: 13 heavy-tailed integer counts (some missing), 26
categorical 32-bit hashes drawn with Zipf-like frequencies (some missing). The
label of a row is drawn from a hidden "teacher": a random logistic model with
per-value effects and factorization-machine pair interactions of the
categorical values, plus linear terms in the log counts. The teacher's own AUC
on the eval split is the best any model can reach, so a run can say how close
it got.

Every row is a pure function of (seed, split, row index): any range of rows can
be produced in any order, which makes resuming exact and lets processes read
disjoint shards.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dlrm_jax import hashing
from dlrm_jax.train import metrics
from dlrm_jax.data import rows as rows_lib

NUM_INT, NUM_CAT = rows_lib.NUM_INT, rows_lib.NUM_CAT
BLOCK = 4096
_SPLITS = {'train': 0, 'eval': 1}
_FM_DIM = 4

# Share of missing values per column, roughly as in Criteo Kaggle.
_INT_MISSING = (0.45, 0.0, 0.2, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04,
                0.77, 0.22)
_CAT_MISSING = (0.0,) * 2 + (0.03,) * 2 + (0.0,) * 7 + (0.03,) * 2 + (0.0,) + (
    0.03,) + (0.0,) * 3 + (0.44,) * 2 + (0.0, 0.8, 0.03, 0.0, 0.44, 0.44)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Parameters of the generator.

  Attributes:
    seed: the seed of the teacher and of the rows.
    num_train: the rows of the train split.
    num_eval: the rows of the eval split.
    vocab_sizes: the distinct values of each of the 26 categorical columns.
    zipf_exponent: s. Value k of a column has frequency proportional to k^-s.
    logit_scale: the standard deviation of the teacher's logit. Larger is
      easier.
    ctr: the target click rate.

  Raises:
    ValueError: if vocab_sizes does not have 26 values, or if a size or
      split is not positive.
  """

  seed: int = 0
  num_train: int = 1_000_000
  num_eval: int = 50_000
  vocab_sizes: tuple[int, ...] = (
      1000, 500, 50_000, 20_000, 300, 24, 12_000, 600, 3, 30_000, 5000,
      40_000, 3000, 27, 10_000, 35_000, 10, 4000, 2000, 4, 40_000, 18, 15,
      20_000, 100, 15_000)
  zipf_exponent: float = 1.05
  logit_scale: float = 1.6
  ctr: float = 0.25

  def __post_init__(self):
    if len(self.vocab_sizes) != NUM_CAT:
      raise ValueError(
          f'SyntheticSpec.vocab_sizes has {len(self.vocab_sizes)} values; it'
          f' needs {NUM_CAT}.')
    if min(self.vocab_sizes) <= 0 or self.num_train <= 0 or self.num_eval <= 0:
      raise ValueError(
          'SyntheticSpec: vocab_sizes, num_train and num_eval must be'
          f' positive (smallest vocab size {min(self.vocab_sizes)}, num_train'
          f' {self.num_train}, num_eval {self.num_eval}).')


def _hash(values: np.ndarray, salt: int) -> np.ndarray:
  """uint32 hash of uint32 values and a salt, by two rounds of murmur's mix."""
  with np.errstate(over='ignore'):
    z = values.astype(np.uint32) ^ np.uint32((salt * 0x9E3779B9) & 0xFFFFFFFF)
    z = hashing.mix32(z)
    z = hashing.mix32(z + np.uint32(0x6A09E667))
  return z


def _unit(h: np.ndarray) -> np.ndarray:
  """uint32 hash -> float in [-1, 1)."""
  return h.astype(np.float64) / 2.0**31 - 1.0


class SyntheticCriteo:
  """The generator, as the module docstring describes.

  Args:
    spec: the generator's parameters.

  Attributes:
    spec: the generator's parameters.
  """

  def __init__(self, spec: SyntheticSpec):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 12345])
    self._cdfs = []
    for v in spec.vocab_sizes:
      w = np.arange(1, v + 1, dtype=np.float64) ** -spec.zipf_exponent
      self._cdfs.append(np.cumsum(w) / w.sum())
    self._int_mu = rng.uniform(0.0, 4.0, NUM_INT)
    self._int_sigma = rng.uniform(0.5, 1.8, NUM_INT)
    self._int_w = rng.normal(0.0, 1.0, NUM_INT) * (rng.random(NUM_INT) < 0.7)
    self._cat_w = rng.gamma(1.0, 1.0, NUM_CAT) * (rng.random(NUM_CAT) < 0.8)
    self._fm_w = rng.gamma(1.0, 1.0, NUM_CAT) * (rng.random(NUM_CAT) < 0.6)
    salts = rng.integers(1, 2**31, (NUM_CAT, 1 + _FM_DIM))
    self._value_salts = rng.integers(1, 2**31, NUM_CAT)
    # Per-value teacher effects, tabulated by the value's frequency rank.
    self._effect, self._fm = [], []
    for c, v in enumerate(spec.vocab_sizes):
      ranks = np.arange(v, dtype=np.uint32)
      self._effect.append(_unit(_hash(ranks, int(salts[c, 0]))) *
                          self._cat_w[c])
      self._fm.append(np.stack(
          [_unit(_hash(ranks, int(salts[c, 1 + j]))) for j in range(_FM_DIM)],
          axis=1) * self._fm_w[c])
    # Normalize the raw logit to mean 0, std 1 on a calibration sample.
    self._shift, self._scale = 0.0, 1.0
    sample = self._block_raw(0, 0, 2 * BLOCK, rng_tag=99)
    z = self._raw_logit(sample)
    self._shift, self._scale = float(z.mean()), float(z.std() + 1e-9)
    z = (z - self._shift) / self._scale * spec.logit_scale
    self._bias = self._find_bias(z, spec.ctr)

  @staticmethod
  def _find_bias(z: np.ndarray, ctr: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
      mid = (lo + hi) / 2
      if np.mean(1 / (1 + np.exp(-(z + mid)))) < ctr:
        lo = mid
      else:
        hi = mid
    return (lo + hi) / 2

  def num_rows(self, split: str) -> int:
    """Gives the rows of a split.

    Args:
      split: 'train' or 'eval'.

    Returns:
      The split's rows.
    """
    return self.spec.num_train if split == 'train' else self.spec.num_eval

  def _block_raw(self, split_id: int, block: int, n: int, rng_tag: int = 0):
    rng = np.random.default_rng([self.spec.seed, split_id, block, rng_tag])
    ints = np.floor(np.expm1(np.abs(
        rng.normal(self._int_mu, self._int_sigma, (n, NUM_INT))))).astype(
            np.int64)
    ints[:, 1] -= (rng.random(n) < 0.1).astype(np.int64) * 2  # I2 goes < 0
    ints = np.where(rng.random((n, NUM_INT)) < np.array(_INT_MISSING), 0, ints)
    cats = np.empty((n, NUM_CAT), np.int64)
    ranks = np.empty((n, NUM_CAT), np.int64)
    u = rng.random((n, NUM_CAT))
    miss = rng.random((n, NUM_CAT)) < np.array(_CAT_MISSING)
    for c in range(NUM_CAT):
      rank = np.searchsorted(self._cdfs[c], u[:, c], side='right')
      ranks[:, c] = np.minimum(rank, len(self._cdfs[c]) - 1)
      cats[:, c] = _hash(ranks[:, c].astype(np.uint32),
                         int(self._value_salts[c]))
    cats[miss] = -1
    ranks[miss] = -1
    return {'int': ints, 'cat': cats, '_rng': rng, '_rank': ranks}

  def _raw_logit(self, raw) -> np.ndarray:
    x = np.log1p(np.maximum(raw['int'], 0).astype(np.float64))
    z = (x - 2.0) @ self._int_w * 0.3
    fm_sum = np.zeros((x.shape[0], _FM_DIM))
    fm_sq = np.zeros(x.shape[0])
    for c in range(NUM_CAT):
      rank = raw['_rank'][:, c]
      present = rank >= 0
      r = np.maximum(rank, 0)
      z += np.where(present, self._effect[c][r], 0.0)
      if self._fm_w[c] > 0:
        u = self._fm[c][r] * present[:, None]
        fm_sum += u
        fm_sq += np.sum(u * u, axis=1)
    z += 0.5 * (np.sum(fm_sum * fm_sum, axis=1) - fm_sq)
    return z

  def teacher_logit(self, raw) -> np.ndarray:
    """Computes the teacher's logit of generated rows.

    Args:
      raw: generated rows, with 'int' and the private '_rank'.

    Returns:
      `[n]` float64 logits.
    """
    z = (self._raw_logit(raw) - self._shift) / self._scale
    return z * self.spec.logit_scale + self._bias

  @functools.lru_cache(maxsize=64)
  def _block(self, split: str, block: int):
    n_rows = self.num_rows(split)
    n = min(BLOCK, n_rows - block * BLOCK)
    raw = self._block_raw(_SPLITS[split], block, n)
    rng = raw.pop('_rng')
    logit = self.teacher_logit(raw)
    del raw['_rank']
    prob = 1.0 / (1.0 + np.exp(-logit))
    raw['label'] = (rng.random(n) < prob).astype(np.float32)
    raw['teacher_prob'] = prob.astype(np.float32)
    return raw

  def rows(self, split: str, start: int, count: int) -> dict[str, np.ndarray]:
    """Generates consecutive rows of a split.

    Args:
      split: 'train' or 'eval'.
      start: the first row. Rows wrap past the split's end.
      count: the number of rows.

    Returns:
      A raw batch with 'label', 'int', 'cat' and the teacher's probability
      'teacher_prob'.
    """
    n_rows = self.num_rows(split)
    out = {k: [] for k in ('label', 'int', 'cat', 'teacher_prob')}
    pos, left = start % n_rows, count
    while left > 0:
      block, off = divmod(pos, BLOCK)
      b = self._block(split, block)
      take = min(left, len(b['label']) - off)
      for k in out:
        out[k].append(b[k][off:off + take])
      left -= take
      pos = (pos + take) % n_rows
    return {k: np.concatenate(v) for k, v in out.items()}

  def teacher_auc(self) -> float:
    """The AUC of the teacher's own probabilities on the eval split."""
    r = self.rows('eval', 0, self.spec.num_eval)
    return metrics.roc_auc(r['teacher_prob'], r['label'])


def write_criteo_tsv(path: str, rows: int, seed: int = 0,
                     labeled: bool = True) -> None:
  """Writes synthetic rows in Criteo's text layout, streaming, with pyarrow.

  The layout is Kaggle's `train.txt`, or `test.txt` without labels. It is for
  trying the Criteo code paths without the real data: preprocessing, text
  reading and serving. Missing values are written as empty fields.

  Args:
    path: the output file.
    rows: the rows to write.
    seed: the generator's seed.
    labeled: whether to write the label column.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pa_csv  # pylint: disable=g-import-not-at-top
  gen = SyntheticCriteo(SyntheticSpec(seed=seed, num_train=rows, num_eval=1))
  hexd = np.frombuffer(b'0123456789abcdef', np.uint8)
  shifts = np.arange(28, -1, -4, dtype=np.uint32)
  with open(path, 'wb') as out:
    for start in range(0, rows, 262144):
      n = min(262144, rows - start)
      r = gen.rows('train', start, n)
      cols = {}
      if labeled:
        cols['label'] = pa.array(r['label'].astype(np.int64)).cast(pa.string())
      rng = np.random.default_rng([seed, start])
      for j in range(NUM_INT):
        v = r['int'][:, j]
        missing = (v == 0) & (rng.random(n) < 0.3)
        cols[f'i{j}'] = pa.array(v, mask=missing).cast(pa.string())
      for j in range(NUM_CAT):
        v = r['cat'][:, j]
        chars = hexd[(np.maximum(v, 0)[:, None].astype(np.uint32) >> shifts)
                     & 15]
        text = np.frombuffer(chars.astype(np.uint8).tobytes(), 'S8')
        cols[f'c{j}'] = pa.array(text, type=pa.binary(), mask=v < 0).cast(
            pa.string())
      pa_csv.write_csv(pa.table(cols), out, pa_csv.WriteOptions(
          include_header=False, delimiter='\t', quoting_style='none'))
