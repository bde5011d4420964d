"""DLRM on MovieLens 100K: ratings as clicks, with movie and user side tables.

The tabular source (`config.data.source='table'`) reads `u.data` (TSV
without a header: user_id, item_id, rating, timestamp) and joins two side
tables on their keys: `u.item` (movies: title, dates, URL and 19 genre
flags; '|'-separated, latin-1) by `item_id`, and `u.user` (age, gender,
occupation, zip code) by `user_id`. A rating of 4 or 5 is a click
(`label_rule='>= 4'`).

Features: user and item ids (integers, one row each), the movie's genres as
a bag of up to 19 ids read from its genre flags (mean-pooled), the user's
gender (a vocabulary), occupation and zip code (hashed), and age (a dense
value, and bucketized into an id).

  python -m dlrm_jax.main --config=configs/movielens.py \
      --config.data.train_path=../shared/data/movielens/ml-100k/u.data.first20000

The side tables `u.item` and `u.user` are read from `../shared` beside the
checkout (or `$DLRM_SHARED_DIR`); `--config=configs/movielens.py:<dir>`
names another folder for them.
"""

import os

from ml_collections import config_dict

from configs import criteo

GENRES = ('unknown', 'Action', 'Adventure', 'Animation', 'Childrens',
          'Comedy', 'Crime', 'Documentary', 'Drama', 'Fantasy', 'Film-Noir',
          'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller',
          'War', 'Western')
ITEM_COLUMNS = ('item_id', 'title', 'release_date', 'video_release_date',
                'url') + GENRES
USER_COLUMNS = ('user_id', 'age', 'gender', 'occupation', 'zip')
DEFAULT_DIR = os.path.join(
    os.environ.get('DLRM_SHARED_DIR') or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..',
        'shared'), 'data', 'movielens', 'ml-100k')
DIM = 8


def _id(input_column, dim=DIM, **fields):
  return config_dict.ConfigDict(dict(type='id', input=input_column,
                                     embedding_dim=dim, **fields))


def _side(path, key, columns):
  return config_dict.ConfigDict(dict(
      path=path,             # the side table's file
      key=key,               # its key column
      join_on=key,           # the ratings' column holding the key
      format='csv', delimiter='|', header=False, columns=list(columns),
      encoding='latin-1', quote_char='',
  ))


def get_config(arg=None):
  """Returns the config; `arg` is the folder of u.item and u.user."""
  folder = os.path.abspath(arg or DEFAULT_DIR)
  config = criteo.get_config('small_data')  # small-data regularization
  config.variant = 'default'
  config.data.source = 'table'
  config.data.table = criteo.table_config(label='rating', label_rule='>= 4')
  config.data.table.format = 'tsv'
  config.data.table.header = False
  config.data.table.columns = ['user_id', 'item_id', 'rating', 'timestamp']
  config.data.table.side_tables.item = _side(
      os.path.join(folder, 'u.item'), 'item_id', ITEM_COLUMNS)
  config.data.table.side_tables.user = _side(
      os.path.join(folder, 'u.user'), 'user_id', USER_COLUMNS)
  config.features = config_dict.ConfigDict(dict(
      user_id=_id('user_id', num_buckets=1000),   # integer ids, 943 users
      item_id=_id('item_id', num_buckets=1700),   # integer ids, 1682 movies
      genres=_id('genres', num_buckets=len(GENRES) + 1,  # a bag of genre ids
                 flag_columns=list(GENRES),        # from the 0/1 genre flags
                 max_ids=len(GENRES), combiner='mean'),
      gender=_id('gender', vocab_list=['', 'M', 'F']),  # row 0: unknown
      occupation=_id('occupation', hash_bucket_size=64),
      zip=_id('zip', hash_bucket_size=1000),
      age_bucket=config_dict.ConfigDict(dict(
          type='raw', input='age', normalizer='none',
          boundaries=[18, 25, 35, 45, 50, 56], embedding_dim=DIM)),
      age=config_dict.ConfigDict(dict(type='raw', input='age',
                                      normalizer='log(x+1)')),
  ))
  config.model.feature_groups = config_dict.ConfigDict(dict(
      dense=['age'],
      sparse=['user_id', 'item_id', 'genres', 'gender', 'occupation', 'zip',
              'age_bucket'],
  ))
  config.model.dense_mlp = criteo.mlp([16, DIM])
  config.embedding.tables = config_dict.ConfigDict()
  config.embedding.sharding_overrides = config_dict.ConfigDict()
  config.admission.min_count = 0   # every user and movie keeps its row
  config.eval_every_steps = 50
  config.log_every_steps = 50
  config.checkpoint_every_steps = 50
  return config
