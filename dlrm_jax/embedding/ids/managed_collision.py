"""Managed-collision remapping of unbounded raw ids to rows of a bounded table.

The host-side (numpy) counterpart of TorchRec's ManagedCollision modules and
TorchEasyRec's zero-collision hash. A feature whose raw ids are unbounded
(64-bit hashes) keeps the ids now in use in a table of `num_rows` rows. Row 0
is reserved for missing values; rows 1..num_rows-1 are given to raw ids. When
a new id arrives and no row is free, the remapper evicts an id that the
current batch does not use:

  lru: the least recently seen id (ties: the smaller row);
  lfu: the least frequently seen id (ties: the least recently seen, then the
       smaller row).

Within one call the new ids, in ascending raw-id order, take the rows made
available in order: free rows ascending, then the victims in eviction order.
So the mapping is a function of the state and the inputs alone, and a resumed
run maps ids exactly as an uninterrupted one. The rows (re)assigned in a call
are reported, and the caller must reset their embedding and optimizer state
before the new ids use them.

The state is kept as per-row arrays (`owner`, `last_seen`, `count`, all
`[num_rows]`) plus the live ids sorted with their rows, so a batch is remapped
with sorts and binary searches rather than a Python loop per id.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

POLICIES = ('lru', 'lfu')

MISSING = -1  # A raw id of -1 marks a missing value: it maps to row 0.
PADDING = -2  # A raw id of -2 pads a bag: it maps to row -1 ("no id").
MISSING_ROW = 0

_MAX_ROWS = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max
_STATE_KEYS = ('num_rows', 'policy', 'step', 'owner', 'last_seen', 'count')


def _sorted_unique(
    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Groups non-negative int64 ids.

  np.argsort of int64 is several times slower than np.sort, so this sorts
  keys that pack each id (its offset from the smallest, shifted right if the
  span is too wide) above its position, and reads the order from the low bits.
  When the shift merges distinct ids, their runs are re-sorted by id.

  Args:
    ids: int64 [N] ids >= 0, N >= 1.

  Returns:
    `(order, uniq, counts)`. `ids[order]` is ascending. It is each `uniq[i]`
    repeated `counts[i]` times, with `uniq` ascending and distinct.
  """
  n = ids.size
  bits = max((n - 1).bit_length(), 1)
  low = int(ids.min())
  span = int(ids.max()) - low
  shift = max(span.bit_length() + bits - 63, 0)
  key = ids - low
  key >>= shift
  key <<= bits
  key |= np.arange(n, dtype=np.int64)
  key.sort()
  order = key & ((1 << bits) - 1)
  key >>= bits
  if shift == 0:
    sorted_ids = key
    sorted_ids += low
  else:
    sorted_ids = ids[order]
    same_key = key[1:] == key[:-1]
    mixed = same_key & (sorted_ids[1:] != sorted_ids[:-1])
    if mixed.any():
      # Runs of equal keys holding several ids: sort each by id.
      run = np.zeros(n, np.int64)
      np.cumsum(~same_key, out=run[1:])
      redo = np.flatnonzero(np.isin(run, run[1:][mixed]))
      redo = redo[np.lexsort((sorted_ids[redo], run[redo]))]
      order[np.sort(redo)] = order[redo]
      sorted_ids = ids[order]
  first = np.empty(n, bool)
  first[0] = True
  np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=first[1:])
  starts = np.flatnonzero(first)
  return order, sorted_ids[starts], np.diff(starts, append=n)


def _first_k(idx: np.ndarray, keys: Sequence[np.ndarray],
             k: int) -> np.ndarray:
  """The k entries of `idx` (ascending) smallest by (keys..., idx).

  Selects by partitioning on each key in turn, then breaks the last ties by
  position (`idx` is ascending, so by row). Linear time in len(idx).

  Args:
    idx: candidate rows, ascending.
    keys: sort keys aligned with `idx`, most significant first.
    k: how many to select, 0 <= k <= len(idx).

  Returns:
    The selected rows, in no particular order.
  """
  chosen = []
  keys = list(keys)
  while keys and 0 < k < idx.size:
    key = keys.pop(0)
    kth = np.partition(key, k - 1)[k - 1]
    less = key < kth
    chosen.append(idx[less])
    k -= int(np.count_nonzero(less))
    tie = key == kth
    idx = idx[tie]
    keys = [other[tie] for other in keys]
  chosen.append(idx[:k])
  return np.concatenate(chosen)


class ManagedCollisionRemapper:
  """Maps unbounded raw ids of one feature to rows of a bounded table.

  Attributes:
    num_rows: the rows of the table, row 0 for missing values included.
    policy: the eviction policy, one of POLICIES.
    name: a name for error messages, such as the feature's.
  """

  def __init__(self, num_rows: int, policy: str = 'lru', *, name: str = ''):
    """Makes an empty remapper.

    Args:
      num_rows: rows of the table, >= 2 and < 2**31.
      policy: one of POLICIES.
      name: a name for error messages.

    Raises:
      ValueError: if num_rows or policy is invalid.
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows,
                                                    (int, np.integer)):
      raise ValueError(
          f'managed-collision remapper {name!r}: num_rows must be an int, got '
          f'{num_rows!r}.')
    if not 2 <= num_rows <= _MAX_ROWS:
      raise ValueError(
          f'managed-collision remapper {name!r}: num_rows must be in '
          f'[2, {_MAX_ROWS}] (row 0 is reserved for missing values), got '
          f'{num_rows}.')
    if policy not in POLICIES:
      raise ValueError(
          f'managed-collision remapper {name!r}: policy must be one of '
          f'{POLICIES}, got {policy!r}.')
    self.num_rows = int(num_rows)
    self.policy = policy
    self.name = name
    # Per row: the raw id it holds (-1: free; row 0 is never given out), the
    # step it was last seen and how many times it was seen since it got it.
    self._owner = np.full(self.num_rows, -1, np.int64)
    self._last_seen = np.zeros(self.num_rows, np.int64)
    self._count = np.zeros(self.num_rows, np.int64)
    self._step = -1  # The last step remap() was called with.
    self._row_ids = np.arange(self.num_rows, dtype=np.int64)
    # The live raw ids, ascending, and their rows.
    self._keys = np.zeros(0, np.int64)
    self._key_rows = np.zeros(0, np.int32)

  def __repr__(self) -> str:
    return (f'ManagedCollisionRemapper(name={self.name!r}, '
            f'num_rows={self.num_rows}, policy={self.policy!r}, '
            f'live={self._keys.size})')

  @property
  def num_live(self) -> int:
    """How many raw ids hold a row."""
    return int(self._keys.size)

  def _check_raw(self, raw: np.ndarray) -> np.ndarray:
    """Returns raw as int64 after checking its dtype and values."""
    raw = np.asarray(raw)
    if not np.issubdtype(raw.dtype, np.integer):
      raise ValueError(
          f'managed-collision remapper {self.name!r}: raw ids must be '
          f'integers, got dtype {raw.dtype}.')
    if raw.size == 0:
      return raw.astype(np.int64)
    if raw.dtype == np.uint64 and raw.max() > np.iinfo(np.int64).max:
      raise ValueError(
          f'managed-collision remapper {self.name!r}: raw ids must fit int64, '
          f'got {raw.max()}.')
    raw = raw.astype(np.int64, copy=False)
    low = raw.min()
    if low < PADDING:
      raise ValueError(
          f'managed-collision remapper {self.name!r}: raw ids must be >= 0, '
          f'{MISSING} (missing) or {PADDING} (padding), got {low}.')
    return raw

  def _rows_of_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, found) of ids (best ascending) among the live ids."""
    pos = np.searchsorted(self._keys, ids)
    np.minimum(pos, max(self._keys.size - 1, 0), out=pos)
    if self._keys.size == 0:
      found = np.zeros(ids.shape, bool)
      return np.zeros(ids.shape, np.int32), found
    found = self._keys[pos] == ids
    return self._key_rows[pos], found

  def _replace_keys(self, gone_ids: np.ndarray, new_ids: np.ndarray,
                    new_rows: np.ndarray) -> None:
    """Drops live ids from the sorted keys and merges in new (ascending) ids."""
    keys, rows = self._keys, self._key_rows
    if gone_ids.size:
      keep = np.ones(keys.size, bool)
      keep[np.searchsorted(keys, np.sort(gone_ids))] = False
      keys, rows = keys[keep], rows[keep]
    size = keys.size + new_ids.size
    at = np.searchsorted(keys, new_ids)
    at += np.arange(new_ids.size)
    old = np.ones(size, bool)
    old[at] = False
    self._keys = np.empty(size, np.int64)
    self._keys[at] = new_ids
    self._keys[old] = keys
    self._key_rows = np.empty(size, np.int32)
    self._key_rows[at] = new_rows
    self._key_rows[old] = rows

  def _victims(self, used_rows: np.ndarray, k: int) -> np.ndarray:
    """The k rows to evict, in eviction order.

    Args:
      used_rows: rows of the live ids used in this batch (never evicted).
      k: how many rows to evict, at most the number of live ids not used in
        this batch.

    Returns:
      int64 [k] rows, the first to evict first.
    """
    r = self.num_rows
    s = self._step + 1  # last_seen of every live id is in [0, s).
    if self.policy == 'lru':
      packed_max = s * r
    else:
      packed_max = (int(self._count.max()) + 1) * s * r
    if packed_max < _INT64_MAX:
      # One int64 key per row orders rows by (count,) last_seen, row.
      if self.policy == 'lru':
        key = self._last_seen * r
      else:
        key = self._count * s
        key += self._last_seen
        key *= r
      key += self._row_ids
      key[self._owner < 0] = _INT64_MAX
      key[used_rows] = _INT64_MAX
      key.partition(k - 1)
      victims = np.sort(key[:k])
      return victims % r
    # The keys would overflow int64 (huge steps or counts): select key by key.
    evictable = self._owner >= 0
    evictable[used_rows] = False
    cand = np.flatnonzero(evictable)
    if self.policy == 'lru':
      keys = [self._last_seen[cand]]
    else:
      keys = [self._count[cand], self._last_seen[cand]]
    victims = _first_k(cand, keys, k)
    # Eviction order: lexsort's last key is the most significant.
    if self.policy == 'lru':
      order = np.lexsort((victims, self._last_seen[victims]))
    else:
      order = np.lexsort((victims, self._last_seen[victims],
                          self._count[victims]))
    return victims[order]

  def remap(self, raw: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps a batch of raw ids to rows, admitting new ids. It may evict.

    Args:
      raw: an integer array of any shape, such as `[B]` or `[B, L]`. Values
        >= 0 are ids. -1 marks a missing value and -2 bag padding.
      step: the recency clock, the training step. It must not decrease
        between calls. Each id seen gets last_seen = step, and its count
        grows by its occurrences in `raw`.

    Returns:
      A pair `(rows, reset)`. `rows` is int32 of raw's shape: the row of each
      id, 0 for missing values and -1 for padding. `reset` is int32 `[R]`,
      ascending: the rows assigned or reassigned in this call. The caller
      must reset their embedding and optimizer state.

    Raises:
      ValueError: for ids < -2, a non-integer dtype or a decreasing step. Also
        when the batch holds more distinct new ids than rows can be made
        available, that is free rows plus live rows not used by this batch.
        The state is unchanged when it raises.
    """
    raw = self._check_raw(raw)
    step = int(step)
    if step < 0 or step < self._step:
      raise ValueError(
          f'managed-collision remapper {self.name!r}: step must be >= 0 and '
          f'not decrease, got {step} after {self._step}.')
    flat = raw.reshape(-1)
    out = np.where(flat == MISSING, MISSING_ROW, -1).astype(np.int32)
    valid = np.flatnonzero(flat >= 0)
    if valid.size == 0:
      self._step = step
      return out.reshape(raw.shape), np.zeros(0, np.int32)
    ids = flat[valid]

    order, uniq, counts = _sorted_unique(ids)
    rows_u, found = self._rows_of_keys(uniq)
    rows_u = rows_u.astype(np.int64)
    new_pos = np.flatnonzero(~found)
    num_new = new_pos.size
    reset = np.zeros(0, np.int32)
    if num_new:
      num_free = self.num_rows - 1 - self._keys.size
      num_used = uniq.size - num_new
      num_evictable = self._keys.size - num_used
      if num_new > num_free + num_evictable:
        raise ValueError(
            f'managed-collision remapper {self.name!r}: the batch holds '
            f'{num_new} distinct new ids but only {num_free + num_evictable} '
            f'rows can be made available ({num_free} free + {num_evictable} '
            f'live ids not used by the batch; {num_used} live ids are used '
            f'by it; num_rows={self.num_rows}).')
      take_free = min(num_free, num_new)
      k = num_new - take_free
      victims = np.zeros(0, np.int64)
      if k:
        victims = self._victims(rows_u[found], k)
      free = np.zeros(0, np.int64)
      if take_free:
        free = np.flatnonzero(self._owner[1:] < 0)[:take_free] + 1
      new_rows = np.concatenate([free, victims])
      new_ids = uniq[new_pos]
      self._replace_keys(self._owner[victims], new_ids, new_rows)
      self._owner[new_rows] = new_ids
      self._count[new_rows] = 0
      rows_u[new_pos] = new_rows
      reset = np.sort(new_rows).astype(np.int32)

    self._last_seen[rows_u] = step
    self._count[rows_u] += counts
    self._step = step
    valid_rows = np.empty(ids.size, np.int32)
    valid_rows[order] = np.repeat(rows_u, counts)
    out[valid] = valid_rows
    return out.reshape(raw.shape), reset

  def lookup(self, raw: np.ndarray) -> np.ndarray:
    """Gives the rows of ids without changing any state, for eval and serving.

    Args:
      raw: an integer array of any shape, as for `remap`.

    Returns:
      int32 rows of raw's shape. A live id gets its row. Unknown ids and
      missing values get 0. Padding gets -1.

    Raises:
      ValueError: for ids < -2 or a non-integer dtype.
    """
    raw = self._check_raw(raw)
    flat = raw.reshape(-1)
    out = np.where(flat == MISSING, MISSING_ROW, -1).astype(np.int32)
    valid = np.flatnonzero(flat >= 0)
    if valid.size:
      order, uniq, counts = _sorted_unique(flat[valid])
      rows, found = self._rows_of_keys(uniq)
      valid_rows = np.empty(valid.size, np.int32)
      valid_rows[order] = np.repeat(np.where(found, rows, MISSING_ROW), counts)
      out[valid] = valid_rows
    return out.reshape(raw.shape)

  def live_ids(self) -> dict[int, int]:
    """Raw id -> row of every live id, for tests and inspection."""
    return dict(zip(self._keys.tolist(), self._key_rows.tolist()))

  def state_dict(self) -> dict[str, np.ndarray]:
    """All state as numpy arrays of fixed dtypes and shapes.

    Returns:
      num_rows: int64 [], the table's rows.
      policy: int32 [], the policy's index in POLICIES.
      step: int64 [], the last step remap() was called with. -1 means never.
      owner: int64 [num_rows], the raw id holding each row, -1 if none.
      last_seen: int64 [num_rows], the step each row's id was last seen.
      count: int64 [num_rows], how many times each row's id was seen since it
        got the row.
    """
    return {
        'num_rows': np.asarray(self.num_rows, np.int64),
        'policy': np.asarray(POLICIES.index(self.policy), np.int32),
        'step': np.asarray(self._step, np.int64),
        'owner': self._owner.copy(),
        'last_seen': self._last_seen.copy(),
        'count': self._count.copy(),
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, np.ndarray], *,
                      name: str = '') -> ManagedCollisionRemapper:
    """Restores a remapper from state_dict()'s output.

    Args:
      state: arrays as returned by state_dict().
      name: a name for error messages.

    Returns:
      The remapper, with the num_rows and policy of `state`.

    Raises:
      ValueError: if `state` is incomplete or malformed.
    """
    missing = [key for key in ('num_rows', 'policy') if key not in state]
    if missing:
      raise ValueError(
          f'managed-collision remapper {name!r}: state lacks {missing}.')
    policy = int(np.asarray(state['policy']))
    if not 0 <= policy < len(POLICIES):
      raise ValueError(
          f'managed-collision remapper {name!r}: state policy index {policy} '
          f'is not in [0, {len(POLICIES)}).')
    remapper = cls(int(np.asarray(state['num_rows'])), POLICIES[policy],
                   name=name)
    remapper.load_state_dict(state)
    return remapper

  def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
    """Restores state_dict()'s output into this remapper.

    Args:
      state: arrays as returned by state_dict(), such as after np.savez and
        np.load or an orbax checkpoint.

    Raises:
      ValueError: if keys are missing, if num_rows or policy differ from this
        remapper's, or if the arrays are malformed.
    """
    prefix = f'managed-collision remapper {self.name!r}'
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
      raise ValueError(f'{prefix}: state lacks {missing}.')
    num_rows = int(np.asarray(state['num_rows']))
    if num_rows != self.num_rows:
      raise ValueError(
          f'{prefix}: state has num_rows={num_rows}, the remapper has '
          f'num_rows={self.num_rows}.')
    policy = int(np.asarray(state['policy']))
    if policy != POLICIES.index(self.policy):
      got = POLICIES[policy] if 0 <= policy < len(POLICIES) else policy
      raise ValueError(
          f'{prefix}: state has policy={got!r}, the remapper has '
          f'policy={self.policy!r}.')
    arrays = {}
    for key in ('owner', 'last_seen', 'count'):
      value = np.asarray(state[key])
      if value.shape != (self.num_rows,) or not np.issubdtype(
          value.dtype, np.integer):
        raise ValueError(
            f'{prefix}: state {key} must be integers of shape '
            f'({self.num_rows},), got {value.dtype} {value.shape}.')
      arrays[key] = value.astype(np.int64)  # A copy.
    owner = arrays['owner']
    if owner[0] != -1 or owner.min() < -1:
      raise ValueError(
          f'{prefix}: state owner must be -1 at row 0 and >= -1 elsewhere, '
          f'got owner[0]={owner[0]}, min {owner.min()}.')
    rows = np.flatnonzero(owner >= 0)
    order = np.argsort(owner[rows], kind='stable')
    keys = owner[rows][order]
    if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
      raise ValueError(f'{prefix}: state owner gives an id several rows.')
    step = int(np.asarray(state['step']))
    if rows.size:
      last_seen = arrays['last_seen'][rows]
      count = arrays['count'][rows]
      if last_seen.min() < 0 or last_seen.max() > step or count.min() < 0:
        raise ValueError(
            f'{prefix}: state last_seen of live ids must be in [0, step={step}]'
            f' and count >= 0, got last_seen in [{last_seen.min()}, '
            f'{last_seen.max()}], count >= {count.min()}.')
    self._owner = owner
    self._last_seen = arrays['last_seen']
    self._count = arrays['count']
    self._step = step
    self._keys = keys
    self._key_rows = rows[order].astype(np.int32)
