"""Training: the trainer, the loop, and what a run writes.

  trainer        Trainer (model, embedding engine, optimizers, compiled
                 train/predict/eval steps), TrainState, make_plan
  table_updates  optax with SparseEmbed: with_tables (dense transform,
                 tables passed through), apply_updates (tables replaced),
                 nnx_update
  loop           train_and_evaluate (resume, train, finish), StopRequest,
                 TrainingInterrupted, NonFiniteLossError, InvalidIdError
  checkpoint     Checkpointer (orbax, fingerprinted), BestCheckpointer
  early_stopping EarlyStopping (Keras semantics)
  workdir_lock   WorkdirLock: one writer per workdir
  reporting      metrics.jsonl, TensorBoard, plots, the summary box
  metrics        exact AUC, log loss, accuracy, calibration
  schedules      learning-rate schedules of both optimizers

The package imports none of them: `from dlrm_jax.train import loop`.
"""
