"""DLRM on Avazu CTR logs: a CSV with a header, read by column name.

The tabular source (`config.data.source='table'`, `dlrm_jax.data.table`)
reads the columns the features name. Every Avazu column but `id` and
`click` is categorical: hashed 8-hex-digit ids (`site_id`, `device_ip`,
...) and small integers (`C1`, `banner_pos`, `C14`..`C21`), all hashed as
text into `hash_bucket_size` rows. `hour` (YYMMDDHH) is an id too. One
cross, `site_id x app_id`, shows a combo feature. Avazu has no numeric
column, so there is no dense group.

  python -m dlrm_jax.main --config=configs/avazu.py \
      --config.data.train_path=../shared/data/avazu/avazu_train_head_9999.csv

Variants: `default` (the sample above: 9,999 rows, the last 10% for eval),
`full` (Kaggle's 40M-row train.csv: larger tables and batches).
"""

from ml_collections import config_dict

from configs import criteo

# (column, hash_bucket_size) of the sample; `full` multiplies the big ones.
COLUMNS = (
    ('hour', 1_000), ('C1', 100), ('banner_pos', 100), ('site_id', 10_000),
    ('site_domain', 10_000), ('site_category', 100), ('app_id', 10_000),
    ('app_domain', 1_000), ('app_category', 100), ('device_id', 10_000),
    ('device_ip', 10_000), ('device_model', 10_000), ('device_type', 100),
    ('device_conn_type', 100), ('C14', 10_000), ('C15', 100),
    ('C16', 100), ('C17', 1_000), ('C18', 100), ('C19', 1_000),
    ('C20', 1_000), ('C21', 1_000))
VARIANTS = ('default', 'full')


def get_config(arg=None):
  """Returns the config of a variant (VARIANTS; '' is default)."""
  variant = arg or 'default'
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/avazu.py;"
                     f" choose one of {', '.join(VARIANTS)}.")
  config = criteo.get_config('small_data')  # small-data regularization
  config.variant = variant
  scale = 100 if variant == 'full' else 1
  dim = 16 if variant == 'full' else 8
  config.data.source = 'table'
  config.data.table = criteo.table_config(label='click')  # CSV with a header
  config.features = config_dict.ConfigDict()
  for column, rows in COLUMNS:
    config.features[column] = config_dict.ConfigDict(dict(
        type='id',                  # a categorical column
        input=column,               # its name in the header
        embedding_dim=dim,          # embedding width
        hash_bucket_size=rows * (scale if rows >= 10_000 else 1),  # hashed rows
        value_dtype='string',       # hash the text (ints and hex ids alike)
    ))
  config.features.site_app = config_dict.ConfigDict(dict(
      type='combo',                 # a cross of two columns
      inputs=['site_id', 'app_id'],
      embedding_dim=dim,
      hash_bucket_size=10_000 * scale,
  ))
  config.model.feature_groups = config_dict.ConfigDict(dict(
      dense=[],                     # Avazu has no numeric column
      sparse=[c for c, _ in COLUMNS] + ['site_app'],
  ))
  config.model.dense_mlp = None        # no dense group, no dense MLP
  config.embedding.tables = config_dict.ConfigDict()
  config.embedding.sharding_overrides = config_dict.ConfigDict()
  config.admission.min_count = 2 if variant == 'default' else 10
  if variant == 'full':
    config.batch_size = 4096
    config.eval_batch_size = 16384
    config.min_train_steps = 0
    config.eval_every_steps = 5000
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
  return config
