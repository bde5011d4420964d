"""DLRM on Criteo click logs (Kaggle layout by default).

Variants, chosen with a suffix: `--config=configs/criteo.py:<variant>`.
  default:  Criteo Kaggle layout. Trains on `data.train_path` when given,
            otherwise on the built-in synthetic click logs; a few minutes on a
            2-core CPU.
  terabyte: TorchEasyRec's `examples/dlrm_criteo.config` on Criteo 1TB
            (40M-row tables; needs accelerators with ~20 GB for the tables).
  terabyte_cached: `terabyte` at embedding dim 32: 49 GiB of tables and
            Adagrad state, cached (2% of each table's rows on the devices,
            every row in memmap files under the workdir), so it trains on
            a machine with less memory than its tables.
  tiny:     a very small model and data set for tests.
  mlperf_dcnv2: the MLPerf Training DLRM-DCNv2 recipe on Criteo 1TB with
            multi-hot bags (DCNv2 cross network, Adagrad, batch 65,536, stop
            at AUC 0.80275); 97 GiB of float32 tables and as much Adagrad
            state.
  mlperf_dcnv2_tiny: the same model family, shrunk for CPU tests.
  tzrec_criteo:    TorchEasyRec's benchmark DLRM recipe on Criteo 1TB.
  torchrec_criteo: TorchRec's DLRM example (examples/dlrm) on Criteo 1TB.
  small_data:      the settings benchmarks/quality.py documents for a few
                   thousand real rows (see the README's small-data advice).

Any field can be overridden on the command line, e.g.
  --config.data.train_path=/data/criteo/train.txt --config.batch_size=4096
  --config.model.dense_mlp.hidden_units=[32,8]   (or =32,8: lists too)
  --config.embedding.sharding_overrides.cat_3=row_wise
  --config.embedding.tables.cat_3.dtype=bfloat16
"""

from ml_collections import config_dict

from dlrm_jax.data import criteo as criteo_reader
from dlrm_jax.data import loader
from dlrm_jax.data import rows

NUM_INT, NUM_CAT = rows.NUM_INT, rows.NUM_CAT

# TorchEasyRec's table sizes for Criteo 1TB (examples/dlrm_criteo.config).
TERABYTE_NUM_BUCKETS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
    405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000,
    590152, 12973, 108, 36)

# MLPerf DLRM-DCNv2's bag sizes of the 26 categorical features
# (mlcommons/training recommendation_v2/torchrec_dlrm README, --multi_hot_sizes).
MLPERF_HOTNESS = loader.MLPERF_HOTNESS

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
        # (None fields are typed placeholders, so the command line can set
        # them: --config.features.int_0.boundaries=[1,10,100].)
        boundaries=config_dict.placeholder(list),  # a list bucketizes it into an id feature
        embedding_dim=config_dict.placeholder(int),  # embedding width when bucketized
        embedding_name=config_dict.placeholder(str),  # share a table with other features
    ))
  for i in range(NUM_CAT):
    features[f'cat_{i}'] = config_dict.ConfigDict(dict(
        type='id',                    # id: a categorical input column
        input=f'cat_{i}',             # input column
        embedding_dim=embedding_dim,  # embedding width
        num_buckets=num_buckets[i],   # table rows (row 0: missing value)
        hash_bucket_size=config_dict.placeholder(int),  # alternative to num_buckets: hashed ids
        embedding_name=config_dict.placeholder(str),    # share a table with other features
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


def table_config(label='label', label_rule=''):
  """`config.data.table`: the layout of a tabular source (source 'table')."""
  return config_dict.ConfigDict(dict(
      format='auto',        # csv, tsv, parquet or auto (by file name)
      delimiter='',         # text field separator; '': the format's own
      header=True,          # text files start with the column names
      columns=[],           # column names of text without a header
      encoding='utf8',      # text encoding, e.g. latin-1
      quote_char='"',       # text quote character; '': none
      label=label,          # the label column ('' for unlabeled data)
      label_rule=label_rule,  # '': 0/1 labels; e.g. '>= 4': 1 where it holds
      side_tables=config_dict.ConfigDict(),  # name -> dict(path, key, join_on, format fields)
  ))


def _table_overrides():
  """Per-table overrides, unset (None), for the tables cat_0..cat_25, so
  that `--config.embedding.tables.cat_3.dtype=bfloat16` works; tables of
  other names (embedding_name): set the whole dict."""
  return config_dict.ConfigDict({f'cat_{i}': config_dict.ConfigDict(dict(
      initializer=config_dict.placeholder(str),  # None: config.embedding's
      init_scale=config_dict.placeholder(float),
      dtype=config_dict.placeholder(str),
  )) for i in range(NUM_CAT)})


def mlp(hidden_units):
  """An MLP group of `hidden_units`, with the fields every MLP takes."""
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


# MLPerf DLRM-DCNv2 (mlcommons/training recommendation_v2/torchrec_dlrm README):
# train rows of Criteo 1TB days 0-22 (TOTAL_TRAINING_SAMPLES) and the global
# batch (GLOBAL_BATCH_SIZE).
MLPERF_TRAIN_SAMPLES = 4_195_197_692
MLPERF_BATCH_SIZE = 65_536

VARIANTS = ('default', 'terabyte', 'terabyte_cached', 'tiny', 'mlperf_dcnv2', 'mlperf_dcnv2_tiny',
            'tzrec_criteo', 'torchrec_criteo', 'small_data')


def _tiny_loop(config):
  """Data and loop sizes of the tiny variants: 40 steps, seconds on a CPU."""
  config.data.synthetic.num_train = 16_384
  config.data.synthetic.num_eval = 2048
  config.batch_size = 128
  config.eval_batch_size = 512
  config.num_train_steps = 40
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20


def _small_data(config):
  """Settings for a few thousand real rows (benchmarks/quality.py; chosen on
  its validation part). Each counters a way a DLRM overfits small data."""
  config.features = _features(8, KAGGLE_NUM_BUCKETS, 'log(x+1)')  # small dim: fewer free parameters per id
  config.model.dense_mlp = mlp([64, 8])          # last = embedding dim
  config.model.final = mlp([64, 32])
  config.model.final.dropout_ratio = 0.2          # dropout in the over arch
  config.model.arch_with_sparse = False           # over arch sees the interaction only (reference DLRM)
  config.embedding.optimizer.kind = 'adagrad'     # exact Adagrad (FBGEMM)
  config.embedding.optimizer.schedule = _schedule(0.05)
  config.embedding.optimizer.weight_decay = 1e-4  # L2 on touched rows (FBGEMM L2)
  config.optimizer.kind = 'adamw'                 # MLPs: decoupled weight decay
  config.optimizer.schedule = _schedule(1e-3)
  config.optimizer.weight_decay = 1e-4
  config.admission.min_count = 10                 # ids seen < 10 times share row 0
  config.batch_size = 128                         # more, smaller steps
  config.eval_batch_size = 1024
  config.num_train_steps = -1
  config.num_epochs = 1
  config.min_train_steps = 1000                   # whole epochs up to 1000 steps
  config.eval_every_steps = 25                    # about an epoch of 3,400 rows
  config.log_every_steps = 25
  config.checkpoint_every_steps = 25
  config.early_stopping.metric = 'auc'            # stop when validation AUC
  config.early_stopping.patience = 4              # has not improved for 4 evals
  config.early_stopping.min_delta = 1e-4
  config.keep_best_metric = 'auc'                 # and keep the best checkpoint


def get_config(arg=None):
  """Returns the config of a variant (VARIANTS; '' is default)."""
  variant = arg or 'default'
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown variant {variant!r} of configs/criteo.py; choose one of"
        f" {', '.join(VARIANTS)}.")
  config = config_dict.ConfigDict()
  config.variant = variant                # which get_config variant this is
  config.seed = 0                         # seeds parameters, dropout, data

  # ----- Data ---------------------------------------------------------------
  config.data = config_dict.ConfigDict()
  config.data.source = 'auto'        # auto, synthetic, criteo_tsv, binary, tfds, table
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
  config.data.chunk_rows = criteo_reader.CHUNK_ROWS  # criteo_tsv: rows per read
  config.data.num_threads = 2        # grain: threads preparing batches
  config.data.prefetch = 2           # batches prepared ahead
  config.data.record_batches = False  # log a digest of each batch's ids
  config.data.multi_hot = config_dict.ConfigDict()
  config.data.multi_hot.enabled = False  # MLPerf DLRM-DCNv2 synthetic bags
  config.data.multi_hot.hotness = list(MLPERF_HOTNESS)  # bag size per id feature
  config.data.multi_hot.distribution = 'uniform'  # extra ids: uniform or pareto
  config.data.table = table_config()  # source 'table': see configs/avazu.py
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
  config.model.dense_mlp = mlp([64, 16])    # dense arch; last = embedding dim
  config.model.final = mlp([64, 32])        # over arch
  config.model.arch_with_sparse = True       # feed sparse embeddings to final
  config.model.interaction_self = False      # include the diagonal
  config.model.compute_dtype = 'float32'     # MLP and cross-net compute: float32
                                             # or bfloat16 (weights stay float32)
  config.model.interaction = 'dot'           # dot (DLRM) or dcn (DLRM-DCNv2)
  config.model.dcn = config_dict.ConfigDict(dict(
      num_layers=3,  # dcn: cross layers x_{l+1} = x_0 * (U_l V_l x_l + b_l) + x_l
      rank=512,      # dcn: rank of each layer's U_l V_l
  ))

  # ----- Embedding tables ----------------------------------------------------
  config.embedding = config_dict.ConfigDict()
  config.embedding.initializer = 'uniform'   # uniform, normal, truncated_normal, zeros
  config.embedding.init_scale = config_dict.placeholder(float)  # None: sqrt(1/rows) for uniform
  config.embedding.dtype = 'float32'         # table storage: float32 or bfloat16
  config.embedding.optimizer = config_dict.ConfigDict()
  config.embedding.optimizer.kind = 'adagrad'  # sgd, adagrad, rowwise_adagrad, adam, ftrl
                                               # (adagrad: torch.optim.Adagrad, FBGEMM)
  config.embedding.optimizer.schedule = _schedule(0.05)  # learning-rate schedule
  config.embedding.optimizer.initial_accumulator_value = 0.0  # adagrad start
  config.embedding.optimizer.eps = 1e-8      # denominator epsilon
  config.embedding.optimizer.b1 = 0.9        # adam
  config.embedding.optimizer.b2 = 0.999      # adam
  config.embedding.tables = _table_overrides()  # per-table overrides: name -> fields
  config.embedding.sharding = 'auto'         # auto (planner) or a strategy for all
  config.embedding.sharding_overrides = config_dict.ConfigDict({  # table -> strategy
      f'cat_{i}': config_dict.placeholder(str) for i in range(NUM_CAT)})
  config.embedding.replicate_bytes = 1 << 20  # auto: replicate tables this small
  config.embedding.row_group_size = 0  # >0: big tables row-wise over groups this size
  config.embedding.device_memory_gb = config_dict.placeholder(float)  # auto: budget
  # Tables larger than device memory: `cached` tables keep all rows (and
  # optimizer state) in a host store and a cache of hot rows on the devices.
  config.embedding.cache = config_dict.ConfigDict()
  config.embedding.cache.tables = ''         # cached tables: comma-separated, 'all', or '' (none)
  config.embedding.cache.fraction = 0.2      # cache rows per cached table, as a share of its rows
                                             # (at least what two batches can need)
  config.embedding.cache.rows = config_dict.placeholder(int)  # or this many cache rows each
  config.embedding.cache.directory = 'store'  # store memmap files (relative: in the workdir); '': RAM
  config.embedding.cache.min_hit_rate = 0.5  # warn when a log window's hit rate is below this

  # ----- Dense optimizer -----------------------------------------------------
  config.optimizer = config_dict.ConfigDict()
  # Two Adagrads: optax_adagrad is optax.adagrad, g / sqrt(acc + eps) with acc
  # from initial_accumulator_value; exact_adagrad is torch.optim.Adagrad (as
  # the tables' adagrad), g / (sqrt(acc) + eps) with acc from 0.
  config.optimizer.kind = 'adam'             # sgd, optax_adagrad, exact_adagrad, adam, adamw
  config.optimizer.schedule = _schedule(1e-3)  # learning-rate schedule
  config.optimizer.weight_decay = 0.0        # adamw decoupled decay
  config.optimizer.b1 = 0.9                  # adam/adamw
  config.optimizer.b2 = 0.999                # adam/adamw
  config.optimizer.eps = 1e-8                # adam/adamw/optax_adagrad/exact_adagrad epsilon
  config.optimizer.initial_accumulator_value = 0.1  # optax_adagrad start (optax's)
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
  config.target_auc = 0.0           # stop once an eval reaches it (0: off)
  config.min_train_steps = 0        # small data: train whole epochs up to this
  # Early stopping (Keras EarlyStopping semantics): stop after `patience`
  # evaluations without `metric` improving by more than `min_delta`.
  config.early_stopping = config_dict.ConfigDict()
  config.early_stopping.metric = 'auc'      # auc, log_loss, accuracy, loss
  config.early_stopping.mode = config_dict.placeholder(str)  # max/min; None: by metric
  config.early_stopping.patience = 0        # evaluations; 0: off
  config.early_stopping.min_delta = 0.0     # least improvement that counts
  config.keep_best_metric = config_dict.placeholder(str)  # e.g. 'auc': keep best ckpt
  # Rare-id admission (streaming sources): ids seen fewer than min_count
  # times in training share row oov_row; counted in a count-min sketch.
  config.admission = config_dict.ConfigDict()
  config.admission.min_count = 0            # 0 or 1: off
  config.admission.oov_row = 0              # row 0: the missing-value row
  config.admission.depth = 4                # sketch rows
  config.admission.width = 1 << 18          # counters per sketch row
  config.admission.features = []            # [] : every id feature

  if variant in ('terabyte', 'terabyte_cached'):
    config.features = _features(16, TERABYTE_NUM_BUCKETS, 'log(x+3)')
    config.model.dense_mlp = mlp([64, 16])
    config.model.final = mlp([64, 32])
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
    if variant == 'terabyte_cached':
      config.features = _features(32, TERABYTE_NUM_BUCKETS, 'log(x+3)')
      config.model.dense_mlp = mlp([64, 32])          # ends at the dim
      config.embedding.cache.tables = 'all'           # every table cached,
      config.embedding.cache.fraction = 0.02          # 2% of its rows on device
      config.embedding.cache.directory = 'store'      # the rest on disk
  elif variant == 'tzrec_criteo':
    # TorchEasyRec's benchmark `dlrm.config` (as summarized in issue 11):
    # expected AUC 0.796 on Criteo 1TB.
    config.features = _features(128, TERABYTE_NUM_BUCKETS, 'log(x+3)')  # dim 128
    config.model.dense_mlp = mlp([512, 256, 128])          # dense MLP 512-256-128
    config.model.final = mlp([1024, 1024, 512, 256])       # final 1024-1024-512-256
    config.model.arch_with_sparse = False                   # arch_with_sparse: false
    config.embedding.optimizer.kind = 'adagrad'             # Adagrad for tables,
    config.embedding.optimizer.schedule = _schedule(0.006)  # lr 0.006
    config.optimizer.kind = 'exact_adagrad'                 # and for the MLPs (torch.optim.Adagrad),
    config.optimizer.schedule = _schedule(0.006)            # lr 0.006
    config.batch_size = 8192                                # batch_size: 8192
    config.eval_batch_size = 16384
    config.num_train_steps = -1
    config.num_epochs = 1                                   # one pass (tzrec)
    config.log_every_steps = 1000
    config.eval_every_steps = 50_000
    config.checkpoint_every_steps = 10_000
  elif variant == 'torchrec_criteo':
    # TorchRec's examples/dlrm/dlrm_main.py as its README runs it on Criteo
    # 1TB: --embedding_dim 128 --dense_arch_layer_sizes 512,256,128
    # --over_arch_layer_sizes 1024,1024,512,256,1 --batch_size 2048 (per GPU)
    # --learning_rate 1.0 (SGD; `--adagrad` switches the tables and MLPs to
    # exact Adagrad: set embedding.optimizer.kind = 'adagrad' and
    # optimizer.kind = 'exact_adagrad',
    # and a smaller learning rate for it).
    config.features = _features(128, TERABYTE_NUM_BUCKETS, 'log(x+3)')  # 40M-capped tables, as --num_embeddings_per_feature
    config.model.dense_mlp = mlp([512, 256, 128])          # dense_arch_layer_sizes
    config.model.final = mlp([1024, 1024, 512, 256])       # over_arch_layer_sizes (+ the logit)
    config.model.arch_with_sparse = False                   # TorchRec's over arch sees the interaction only
    config.model.interaction_self = False                   # InteractionArch: pairs i < j
    config.embedding.optimizer.kind = 'sgd'                 # default optimizer: SGD
    config.embedding.optimizer.schedule = _schedule(1.0)    # --learning_rate 1.0
    config.optimizer.kind = 'sgd'
    config.optimizer.schedule = _schedule(1.0)
    config.batch_size = 2048                                # --batch_size 2048, per GPU: x devices
    config.eval_batch_size = 16384
    config.num_train_steps = -1
    config.num_epochs = 1                                   # --epochs 1
    config.log_every_steps = 1000
    config.eval_every_steps = 50_000
    config.checkpoint_every_steps = 10_000
  elif variant == 'small_data':
    # A few thousand real rows (benchmarks/quality.py): see the README.
    _small_data(config)
  elif variant == 'tiny':
    config.features = _features(8, (101,) * NUM_CAT, 'log(x+1)')
    config.model.dense_mlp = mlp([16, 8])
    config.model.final = mlp([16])
    _tiny_loop(config)
  elif variant in ('mlperf_dcnv2', 'mlperf_dcnv2_tiny'):
    _mlperf_dcnv2(config, tiny=variant == 'mlperf_dcnv2_tiny')
  return config


def _mlperf_dcnv2(config, tiny: bool):
  """The MLPerf Training DLRM-DCNv2 recipe (or its CPU-test shrink).

  Sources: [ref] the MLPerf reference, mlcommons/training
  recommendation_v2/torchrec_dlrm (README.MD run command and dlrm_main.py);
  [rules] the MLPerf Training rules' DLRM-DCNv2 quality target; [torchrec]
  TorchRec's DLRM_DCN / LowRankCrossNet, which the reference instantiates.
  """
  if not tiny:
    # [ref] --embedding_dim 128; --num_embeddings_per_feature: the 26 Criteo
    # 1TB vocabularies capped at 40M rows (= TERABYTE_NUM_BUCKETS); dense
    # inputs log(x + 3) as TorchRec's Criteo preprocessing (which maps
    # negatives through the same log; we clamp them to 0 first).
    config.features = _features(128, TERABYTE_NUM_BUCKETS, 'log(x+3)')
    config.model.dense_mlp = mlp([512, 256, 128])  # [ref] --dense_arch_layer_sizes
    # [ref] --over_arch_layer_sizes 1024,1024,512,256,1: ReLU layers, then
    # the model's own linear output layer (the final 1).
    config.model.final = mlp([1024, 1024, 512, 256])
    config.model.dcn.num_layers = 3    # [ref] --dcn_num_layers=3
    config.model.dcn.rank = 512        # [ref] --dcn_low_rank_dim=512
    lr = 0.005                         # [ref] --learning_rate 0.005
  else:
    config.features = _features(8, (101,) * NUM_CAT, 'log(x+3)')
    config.model.dense_mlp = mlp([16, 8])
    config.model.final = mlp([32, 16])
    config.model.dcn.num_layers = 2
    config.model.dcn.rank = 4
    lr = 0.05                          # 40 steps must learn something
  config.model.interaction = 'dcn'     # [ref] --interaction_type=dcn
  config.model.arch_with_sparse = False  # [torchrec] over arch: cross output only
  config.model.interaction_self = False
  config.model.compute_dtype = 'float32'  # [ref] fp32; bfloat16 for GPU mixed precision

  # [ref] --multi_hot_sizes / --multi_hot_distribution_type uniform: each
  # one-hot id expanded on the fly into a bag of MLPERF_HOTNESS[k] ids.
  config.data.multi_hot.enabled = True
  config.data.multi_hot.hotness = list(MLPERF_HOTNESS)
  config.data.multi_hot.distribution = 'uniform'
  config.data.tfds_name = 'criteo_terabyte'  # days 0-22 train, day 23 eval

  # [ref] --adagrad: torch.optim.Adagrad for the dense and (FBGEMM
  # EXACT_ADAGRAD, applied in backward) the embedding parameters, with
  # dlrm_main.py's ADAGRAD_EPS 1e-10, ADAGRAD_INIT_ACC 0, no weight decay.
  # The schedule is the reference's LRPolicyScheduler with its defaults
  # --lr_warmup_steps 0 --lr_decay_start 0 --lr_decay_steps 0: constant.
  schedule = _schedule(lr, 'warmup_poly')
  config.embedding.optimizer.kind = 'adagrad'
  config.embedding.optimizer.schedule = schedule
  config.embedding.optimizer.initial_accumulator_value = 0.0
  config.embedding.optimizer.eps = 1e-10
  config.optimizer.kind = 'exact_adagrad'  # torch.optim.Adagrad: g / (sqrt(acc) + eps)
  config.optimizer.schedule = config_dict.ConfigDict(schedule.to_dict())
  config.optimizer.initial_accumulator_value = 0.0
  config.optimizer.eps = 1e-10
  config.optimizer.grad_clip_norm = 0.0

  if not tiny:
    config.batch_size = MLPERF_BATCH_SIZE       # [ref] GLOBAL_BATCH_SIZE=65536
    config.eval_batch_size = MLPERF_BATCH_SIZE  # [ref] test batch = batch
    config.num_train_steps = -1
    config.num_epochs = 1                       # [ref] --epochs 1
    # [ref] --validation_freq_within_epoch
    # $((TOTAL_TRAINING_SAMPLES / (GLOBAL_BATCH_SIZE * 20))): 20 evals an
    # epoch, every 0.05 epoch = 3,200 steps.
    config.eval_every_steps = MLPERF_TRAIN_SAMPLES // (MLPERF_BATCH_SIZE * 20)
    config.checkpoint_every_steps = config.eval_every_steps
    config.log_every_steps = 200
    config.target_auc = 0.80275  # [rules] DLRM-DCNv2 quality: eval AUC >= 0.80275
  else:
    _tiny_loop(config)
