"""Worker of input_multiprocess_test (not a test by itself).

  python -m tests.input_multiprocess PORT PROCESS_ID NUM_PROCESSES OUT_JSON \
      TRAIN_FILE EVAL_FILE [SOURCE]

With NUM_PROCESSES > 1 the processes join over 127.0.0.1 (jax.distributed).
Each builds the criteo_tsv data of the tiny config (or, with SOURCE
'table' after the files, the same files read by the tabular source), reads its training share
once (counting the lines its reader hands to the parser), takes a few
lockstep train steps through the checkpointable text stream, saves it in a
checkpoint and restores it, and evaluates the initial state on the eval file.
"""

import json
import os
import sys

import jax
import numpy as np


def main(port, pid, num, out, train_file, eval_file, source='criteo_tsv'):
  if num > 1:
    jax.distributed.initialize(f'127.0.0.1:{port}', num, pid)
  from dlrm_jax.config import build as config_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from dlrm_jax.data import inputs  # pylint: disable=g-import-not-at-top
  from dlrm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import train_test  # pylint: disable=g-import-not-at-top
  config = train_test.tiny_config(**{
      'data.source': source, 'data.train_path': train_file,
      'data.eval_path': eval_file, 'data.shuffle_buffer': 1024,
      'batch_size': 64, 'eval_batch_size': 256})
  if source == 'table':  # Criteo's files read as a table of named columns
    from tests import table_test  # pylint: disable=g-import-not-at-top
    table_test.criteo_as_table(config)
  config = config_lib.resolve_data(config)
  trainer = trainer_lib.Trainer(config)
  data = inputs.make_data(config,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
  share = data.train.source
  rows = list(share.iter_rows())  # the whole share, once
  cat = np.concatenate([r['cat'] if 'cat' in r else np.stack(
      [r[f'cat_{i}'] for i in range(26)], 1) for r in rows])
  train_lines = data.train_lines.lines if data.train_lines else None
  state = trainer.init_state(config.seed)
  acc = trainer.zero_metrics()
  stream = data.train.iterator(prefetch=2)
  stream.set_state(pipeline.TextBatchIterator.state_at(
      data.train.batches_per_epoch - 2))
  for batch in stream:
    state, acc = trainer.train_step(state, trainer.put_batch(batch), acc)
    if stream.position == data.train.batches_per_epoch + 1:  # next epoch
      break
  steps = stream.position
  # The stream saved with the state (the 'data' item, a file per process)
  # and restored into a fresh iterator goes on with the same batch.
  ckpt = ckpt_lib.Checkpointer(os.path.join(os.path.dirname(out),
                                            f'ckpt_{num}'))
  ckpt.save(steps, state, {'step': steps}, data_iter=stream)
  ckpt.wait()
  fresh = data.train.iterator()
  ckpt.restore_data_iterator(steps, fresh)
  ckpt.close()
  resumed_position = fresh.position
  same_batch = bool(np.array_equal(next(fresh)['ids'], next(stream)['ids']))
  stream.close()
  result, probs, labels = trainer.evaluate(trainer.init_state(config.seed),
                                           data.eval)
  with open(out, 'w') as f:
    json.dump({
        'segments': [[getattr(s, 'path', s), getattr(s, 'begin', 0),
                      getattr(s, 'end', None)] for s in share.paths],
        'share_rows': int(len(cat)), 'share_cat_sum': int(cat.sum()),
        'first_cat': cat[0].tolist(), 'last_cat': cat[-1].tolist(),
        'train_lines': train_lines,
        'eval_lines': data.eval_lines.lines if data.eval_lines else None,
        'batches_per_epoch': data.train.batches_per_epoch,
        'steps': int(steps), 'state_step': int(jax.device_get(state.step)),
        'resumed_position': resumed_position, 'resumed_same_batch': same_batch,
        'loss': float(jax.device_get(acc['loss_sum'])),
        'metrics': {k: float(v) for k, v in result.items()},
        'probs': probs.tolist(), 'labels': labels.tolist()}, f)
  if num > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
       sys.argv[5], sys.argv[6], *sys.argv[7:])
