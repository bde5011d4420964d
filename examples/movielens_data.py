"""MovieLens 100K as id columns for `examples/two_tower.py`, and recall@k.

Reads `u.data` (or the `u.data.first20000` sample), `u.user` and `u.item`
of the GroupLens ml-100k folder. Ratings >= 4 are positives; each user's
latest positive (by timestamp) is held out for the test, if the user has
another one to train on. Column values become table rows:

  user: user_id, age band (age // 10), gender, occupation, zip region
        (first digit; 10 for non-numeric zips)
  item: item_id, genres (a bag of up to 6 of the 19 flags, -1 padded),
        release decade (0 for unknown)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass
class MovieLens:
  """Id columns of every user and item, and the train/test positives.

  Attributes:
    user_columns: name -> `[U, 1]` int32 column (row u is user u; row 0 is
      no user, ids start at 1).
    item_columns: name -> `[I, 1]` (or `[I, 6]` for genres) int32.
    train_pairs: `[P, 2]` (user, item) training positives.
    test_pairs: `[Q, 2]` held-out positives, one per user.
  """

  user_columns: dict[str, np.ndarray]
  item_columns: dict[str, np.ndarray]
  train_pairs: np.ndarray
  test_pairs: np.ndarray

  @property
  def user_ids(self) -> np.ndarray:
    """`[U, T_u]` packed ids of every user, columns in `user_columns` order."""
    return np.concatenate(list(self.user_columns.values()), 1)

  @property
  def item_ids(self) -> np.ndarray:
    """`[I, T_i]` packed ids of every item."""
    return np.concatenate(list(self.item_columns.values()), 1)

  @property
  def item_frequency(self) -> np.ndarray:
    """`[I]` each item's share of the training positives."""
    n = np.bincount(self.train_pairs[:, 1],
                    minlength=len(self.item_columns['item_id']))
    return n / n.sum()

  def popularity_scores(self, num_users: int) -> np.ndarray:
    """`[U, I]` every user's scores by the popularity baseline."""
    return np.broadcast_to(self.item_frequency, (num_users,
                                                 len(self.item_frequency)))


def _read(path: str, sep: str) -> list[list[str]]:
  with open(path, encoding='latin-1') as f:
    return [line.rstrip('\n').split(sep) for line in f if line.strip()]


def load(folder: str) -> MovieLens:
  """Reads the ml-100k folder.

  Args:
    folder: the folder with u.data (or u.data.first20000), u.user, u.item.

  Returns:
    The id columns and the positives.

  Raises:
    FileNotFoundError: naming the file that is missing.
  """
  ratings = os.path.join(folder, 'u.data')
  if not os.path.exists(ratings):
    ratings = os.path.join(folder, 'u.data.first20000')
  for path in (ratings, os.path.join(folder, 'u.user'),
               os.path.join(folder, 'u.item')):
    if not os.path.exists(path):
      raise FileNotFoundError(f'MovieLens file not found: {path}')
  users = _read(os.path.join(folder, 'u.user'), '|')
  occupations = sorted({u[3] for u in users})
  n_users = max(int(u[0]) for u in users) + 1
  user_cols = {k: np.zeros((n_users, 1), np.int32) for k in
               ('user_id', 'age', 'gender', 'occupation', 'zip')}
  for uid, age, gender, occ, zipcode in users:
    u = int(uid)
    user_cols['user_id'][u] = u
    user_cols['age'][u] = min(int(age) // 10, 9)
    user_cols['gender'][u] = gender == 'F'
    user_cols['occupation'][u] = occupations.index(occ)
    user_cols['zip'][u] = int(zipcode[0]) if zipcode[:1].isdigit() else 10
  items = _read(os.path.join(folder, 'u.item'), '|')
  n_items = max(int(i[0]) for i in items) + 1
  item_cols = {'item_id': np.zeros((n_items, 1), np.int32),
               'genres': np.full((n_items, 6), -1, np.int32),
               'decade': np.zeros((n_items, 1), np.int32)}
  for row in items:
    i = int(row[0])
    item_cols['item_id'][i] = i
    genres = [g for g, flag in enumerate(row[5:24]) if flag == '1'][:6]
    item_cols['genres'][i, :len(genres)] = genres
    year = row[2][-4:]
    item_cols['decade'][i] = (int(year) - 1900) // 10 if year.isdigit() else 0
  rated = np.array([[int(x) for x in r[:4]] for r in _read(ratings, '\t')])
  pos = rated[rated[:, 2] >= 4]
  pos = pos[np.lexsort((pos[:, 3], pos[:, 0]))]  # by user, then time
  last = np.r_[pos[1:, 0] != pos[:-1, 0], True]
  first = np.r_[True, pos[1:, 0] != pos[:-1, 0]]
  held = last & ~first  # the user's latest positive, if not the only one
  return MovieLens(user_cols, item_cols, pos[~held][:, :2], pos[held][:, :2])


def recall_at_k(scores: np.ndarray, data: MovieLens, k: int) -> float:
  """Share of held-out positives in the user's top k items.

  Items the user rated positively in training and row 0 (no item) are never
  recommended.

  Args:
    scores: `[U, I]` scores.
    data: the split.
    k: the cut-off.

  Returns:
    recall@k over the held-out users.
  """
  scores = np.array(scores, np.float64)
  scores[:, 0] = -np.inf
  scores[data.train_pairs[:, 0], data.train_pairs[:, 1]] = -np.inf
  users, items = data.test_pairs.T
  top = np.argsort(-scores[users], axis=1)[:, :k]
  return float(np.mean(np.any(top == items[:, None], axis=1)))


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the leading dim with rows of row 0 to a multiple of `multiple`."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[:1], extra, 0)]) if extra else x
