"""DLRM on Criteo click logs (Kaggle layout by default).

Variants, chosen with a suffix: `--config=configs/criteo.py:<variant>`.
  default:  Criteo Kaggle layout. Trains on `data.train_path` when given,
            otherwise on the built-in synthetic click logs; a few minutes on a
            2-core CPU.
  terabyte: TorchEasyRec's `examples/dlrm_criteo.config` on Criteo 1TB
            (40M-row tables; needs accelerators with ~20 GB for the tables).
  tiny:     a very small model and data set for tests.

Any field can be overridden on the command line, e.g.
  --config.data.train_path=/data/criteo/train.txt --config.batch_size=4096
"""

from ml_collections import config_dict

NUM_INT, NUM_CAT = 13, 26

# TorchEasyRec's table sizes for Criteo 1TB (examples/dlrm_criteo.config).
TERABYTE_NUM_BUCKETS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
    405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000,
    590152, 12973, 108, 36)

# MLPerf DLRM-DCNv2's bag sizes of the 26 categorical features.
MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12,
                  100, 27, 10, 3, 1, 1)

# Distinct values per categorical column of Criteo Kaggle, capped at 100k:
# every table stays small enough for a laptop.
KAGGLE_NUM_BUCKETS = (
    1460, 583, 100000, 100000, 305, 24, 12517, 633, 3, 93145, 5683, 100000,
    3194, 27, 14992, 100000, 10, 5652, 2173, 4, 100000, 18, 15, 100000, 105,
    100000)


def _features(embedding_dim, num_buckets, normalizer):
  """Raw features int_0..int_12 and id features cat_0..cat_25."""
  features = config_dict.ConfigDict()
  for i in range(NUM_INT):
    features[f'int_{i}'] = config_dict.ConfigDict(dict(
        type='raw',            # raw: a numeric input column
        input=f'int_{i}',      # input column
        normalizer=normalizer,  # 'log(x+1)', 'log(x+3)' or 'none'
        boundaries=None,       # a list bucketizes it into an id feature
        embedding_dim=None,    # embedding width when bucketized
        embedding_name=None,   # share a table with other features
    ))
  for i in range(NUM_CAT):
    features[f'cat_{i}'] = config_dict.ConfigDict(dict(
        type='id',                    # id: a categorical input column
        input=f'cat_{i}',             # input column
        embedding_dim=embedding_dim,  # embedding width
        num_buckets=num_buckets[i],   # table rows (row 0: missing value)
        hash_bucket_size=None,        # alternative to num_buckets: hashed ids
        embedding_name=None,          # share a table with other features
        max_ids=1,                    # ids per example (1: single-hot)
        combiner='sum',               # bag pooling: sum, mean, sqrtn
        # Set num_rows for a managed-collision remapper that gives each live
        # value its own row, evicting by policy (replaces num_buckets).
        managed_collision=config_dict.ConfigDict(dict(
            num_rows=config_dict.placeholder(int),  # table rows
            policy='lru',                           # eviction: lru or lfu
        )),
    ))
  return features


def _mlp(hidden_units):
  return config_dict.ConfigDict(dict(
      hidden_units=list(hidden_units),  # layer widths
      activation='relu',   # relu, gelu, silu, sigmoid, tanh, none, ...
      use_bn=False,        # batch norm after each linear layer
      use_ln=False,        # layer norm after each linear layer
      dropout_ratio=0.0,   # one value, or one per layer
      bias=True,           # linear layers with bias
  ))


def _schedule(learning_rate, kind='constant'):
  return config_dict.ConfigDict(dict(
      kind=kind,               # constant, warmup_poly, cosine
      learning_rate=learning_rate,  # peak learning rate
      warmup_steps=0,          # linear warmup steps
      decay_start_step=0,      # warmup_poly: first step of the decay
      decay_steps=0,           # decay length in steps
      end_learning_rate=0.0,   # rate at the end of the decay
      power=2.0,               # warmup_poly: polynomial power
  ))


def get_config(arg=None):
  """Returns the config of a variant: '' (default), 'terabyte' or 'tiny'."""
  variant = arg or 'default'
  if variant not in ('default', 'terabyte', 'tiny'):
    raise ValueError(
        f"unknown variant {variant!r} of configs/criteo.py; choose default,"
        " terabyte or tiny.")
  config = config_dict.ConfigDict()
  config.variant = variant                # which get_config variant this is
  config.seed = 0                         # seeds parameters, dropout, data

  # ----- Data ---------------------------------------------------------------
  config.data = config_dict.ConfigDict()
  config.data.source = 'auto'        # auto, synthetic, criteo_tsv, binary, tfds
                                     # (auto: criteo_tsv if train_path, else synthetic)
  config.data.train_path = ''        # criteo_tsv: file, glob, comma list or list
  config.data.eval_path = ''         # criteo_tsv: same; empty: eval_fraction split
  config.data.eval_fraction = 0.1    # share of the train rows held out for eval
  config.data.labeled_eval = True    # eval files carry labels (40 fields)
  config.data.bad_lines = 'error'    # malformed lines: 'error' (stop) or 'skip'
  config.data.check_ids = True       # reject ids outside their table on the host
  config.data.binary_dir = ''        # binary: output_dir of dlrm_jax.data.preprocess
  config.data.tfds_name = 'criteo_kaggle'  # tfds: criteo_kaggle or criteo_terabyte
  config.data.tfds_data_dir = ''     # tfds: data_dir of the prepared dataset
  config.data.tfds_train_split = 'train'  # tfds: training split
  config.data.tfds_eval_split = ''   # tfds: eval split; empty: eval_fraction
  config.data.shuffle = True         # global shuffle of random-access sources
  config.data.shuffle_buffer = 0     # criteo_tsv: rows per seeded shuffle window
  config.data.chunk_rows = 65536     # criteo_tsv: rows per read
  config.data.num_threads = 2        # grain: threads preparing batches
  config.data.prefetch = 2           # batches prepared ahead
  config.data.record_batches = False  # log a digest of each batch's ids
  config.data.multi_hot = config_dict.ConfigDict()
  config.data.multi_hot.enabled = False  # MLPerf DLRM-DCNv2 synthetic bags
  config.data.multi_hot.hotness = list(MLPERF_HOTNESS)  # bag size per id feature
  config.data.multi_hot.distribution = 'uniform'  # extra ids: uniform or pareto
  config.data.synthetic = config_dict.ConfigDict()
  config.data.synthetic.num_train = 3_000_000  # rows in the synthetic train split
  config.data.synthetic.num_eval = 100_000     # rows in the synthetic eval split
  config.data.synthetic.zipf_exponent = 1.05   # skew of id frequencies
  config.data.synthetic.logit_scale = 1.6      # teacher strength (larger: easier)

  # ----- Features ------------------------------------------------------------
  config.features = _features(16, KAGGLE_NUM_BUCKETS, 'log(x+1)')

  # ----- Model ---------------------------------------------------------------
  config.model = config_dict.ConfigDict()
  config.model.name = 'dlrm'                 # the only model for now
  config.model.feature_groups = config_dict.ConfigDict(dict(
      dense=[f'int_{i}' for i in range(NUM_INT)],   # optional dense group
      sparse=[f'cat_{i}' for i in range(NUM_CAT)],  # required sparse group
  ))
  config.model.dense_mlp = _mlp([64, 16])    # dense arch; last = embedding dim
  config.model.final = _mlp([64, 32])        # over arch
  config.model.arch_with_sparse = True       # feed sparse embeddings to final
  config.model.interaction_self = False      # include the diagonal
  config.model.compute_dtype = 'float32'     # MLP compute: float32 or bfloat16

  # ----- Embedding tables ----------------------------------------------------
  config.embedding = config_dict.ConfigDict()
  config.embedding.initializer = 'uniform'   # uniform, normal, truncated_normal, zeros
  config.embedding.init_scale = None         # None: sqrt(1/rows) for uniform
  config.embedding.dtype = 'float32'         # table storage: float32 or bfloat16
  config.embedding.optimizer = config_dict.ConfigDict()
  config.embedding.optimizer.kind = 'adagrad'  # sgd, adagrad, rowwise_adagrad, adam
  config.embedding.optimizer.schedule = _schedule(0.05)  # learning-rate schedule
  config.embedding.optimizer.initial_accumulator_value = 0.0  # adagrad start
  config.embedding.optimizer.eps = 1e-8      # denominator epsilon
  config.embedding.optimizer.b1 = 0.9        # adam
  config.embedding.optimizer.b2 = 0.999      # adam
  config.embedding.tables = config_dict.ConfigDict()  # per-table overrides: name -> fields
  config.embedding.sharding = 'auto'         # auto (planner) or a strategy for all
  config.embedding.sharding_overrides = config_dict.ConfigDict()  # table -> strategy
  config.embedding.replicate_bytes = 1 << 20  # auto: replicate tables this small
  config.embedding.row_group_size = 0  # >0: big tables row-wise over groups this size
  config.embedding.device_memory_gb = config_dict.placeholder(float)  # auto: budget

  # ----- Dense optimizer -----------------------------------------------------
  config.optimizer = config_dict.ConfigDict()
  config.optimizer.kind = 'adam'             # sgd, adagrad, adam, adamw
  config.optimizer.schedule = _schedule(1e-3)  # learning-rate schedule
  config.optimizer.weight_decay = 0.0        # adamw decoupled decay
  config.optimizer.b1 = 0.9                  # adam/adamw
  config.optimizer.b2 = 0.999                # adam/adamw
  config.optimizer.eps = 1e-8                # adam/adamw/adagrad epsilon
  config.optimizer.momentum = 0.0            # sgd momentum
  config.optimizer.grad_clip_norm = 0.0      # clip dense grads (0: off)

  # ----- Mesh ----------------------------------------------------------------
  config.mesh = config_dict.ConfigDict()
  config.mesh.data = 1      # replicas of the table shards; -1: the rest
  config.mesh.model = -1    # devices sharing the tables; -1: the rest

  # ----- Loop ----------------------------------------------------------------
  config.batch_size = 1024          # global batch
  config.eval_batch_size = 4096     # global eval batch
  config.num_train_steps = -1       # -1: num_epochs over the train rows
  config.num_epochs = 1             # used when num_train_steps is -1
  config.log_every_steps = 200      # progress line and metrics.jsonl row
  config.eval_every_steps = 1000    # full evaluation (and at the end)
  config.checkpoint_every_steps = 1000  # checkpoint (and at the end)
  config.max_to_keep = 3            # checkpoints kept

  if variant == 'terabyte':
    config.features = _features(16, TERABYTE_NUM_BUCKETS, 'log(x+3)')
    config.model.dense_mlp = _mlp([64, 16])
    config.model.final = _mlp([64, 32])
    config.embedding.optimizer.kind = 'adagrad'
    config.embedding.optimizer.schedule = _schedule(0.001)
    config.optimizer.kind = 'adam'
    config.optimizer.schedule = _schedule(0.001)
    config.batch_size = 8192
    config.eval_batch_size = 16384
    config.num_train_steps = -1
    config.num_epochs = 1
    config.log_every_steps = 1000
    config.eval_every_steps = 50_000
    config.checkpoint_every_steps = 10_000
  elif variant == 'tiny':
    config.features = _features(8, (101,) * NUM_CAT, 'log(x+1)')
    config.model.dense_mlp = _mlp([16, 8])
    config.model.final = _mlp([16])
    config.data.synthetic.num_train = 16_384
    config.data.synthetic.num_eval = 2048
    config.batch_size = 128
    config.eval_batch_size = 512
    config.num_train_steps = 40
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
  return config
