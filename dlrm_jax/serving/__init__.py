"""Using a trained model: evaluation, prediction, export and serving.

  offline   load (a run's checkpoint: best, latest or a step), evaluate,
            predict, export: `python -m dlrm_jax.main --mode=...`
  export    ServingModel: the inference function (raw features in,
            probability out) written with jax.export
  tables    the export's per-table files, int8/fp16 rows
  runtime   load_export and the row parser, with jax and numpy only (a
            serving process needs neither flax nor the model code)
  server    the HTTP scoring server (`python -m dlrm_jax.serve`)

The package imports none of them, so `from dlrm_jax.serving import runtime`
stays light.
"""
