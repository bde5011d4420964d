"""Data: readers, the feature transform, pipelines and preprocessing.

  features     the feature definitions and the raw -> model transform
               (normalizers, buckets, the raw value -> row mappings)
  rows         the strict row rules every reader and scorer applies
  criteo       the streaming Criteo text reader (plain or gzip, byte ranges)
  pipeline     text batches, eval batches, the model batch maker
  loader       the grain pipeline of random-access sources
  inputs       make_data: the sources a run spec asks for
  binary       the preprocessed binary format
  preprocess   `python -m dlrm_jax.data.preprocess`: text -> binary
  tfds_criteo  TFDS builders (ArrayRecord, no TensorFlow)
  riegeli      direct, vectorised reads of uncompressed ArrayRecord shards
  synthetic    the built-in click logs with a hidden teacher
  multi_hot    MLPerf's synthetic multi-hot bags
"""
