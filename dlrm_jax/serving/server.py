"""An HTTP scoring server for a dlrm_jax export.

  python -m dlrm_jax.serve --export=DIR --port=8080 [--host=127.0.0.1]
      [--max_batch=256] [--max_wait_ms=2]

Endpoints (JSON in and out):
  GET  /health  200 {"status": "ok", "batches": n, "rows": n, ...};
                503 {"status": "shutting down"} once SIGTERM arrived.
  POST /score   {"rows": ["<Criteo line>", ...]}: tab-separated lines of 39
                fields (13 integers, 26 hex hashes; empty = missing), or 40
                with a label first;
                or {"instances": [{"int_0": 3, "cat_2": "68fd1e64", ...}]}:
                feature dicts, absent or null features missing. A cat_<j>
                string is the hash as Criteo writes it, hex ("12345" is
                0x12345 = 74565); a JSON integer is the hash's value itself
                (12345 is 12345, so "3039" and 12345 are the same id).
                200 {"probabilities": [p, ...]}, one per row, in order.
                400 {"error": "...", "row": i} for a malformed request (bad
                JSON, wrong field count, a bad value: the error names the
                row); the server keeps serving.
                A tabular export (`config.data.source='table'`) takes
                {"instances": [{"site_id": "1fbe01fe", "C1": 1005, ...}]}:
                objects keyed by the config's column names, encoded as
                training encodes them (`dlrm_jax.serving.columns`: side-table
                columns by their join key or given directly); a column that
                is absent or a value that does not parse is a 400 naming the
                instance and the column.

Dynamic batching: requests are queued; one worker takes the first, adds
queued requests until `max_batch` rows or `max_wait_ms` have passed, scores
them as one batch (padded to a power of two, so a symbolic-batch export
compiles a handful of shapes, or split and padded to a fixed-batch export's
size) in a worker thread, and answers each request with its rows.

Graceful shutdown: on SIGTERM (or SIGINT) the server stops accepting
connections, answers the requests already received, then exits 0.

Why aiohttp: one well-kept library (aio-libs, on PyPI since 2014, releases
every few weeks) gives an asyncio HTTP/1.1 server whose handlers share one
event loop with the batching queue (no locks between threads), a client for
the tests and the load generator (`benchmarks/serving.py`), request size
limits, and graceful shutdown that waits for in-flight handlers. The
standard `http.server` runs a thread per connection and has no batching
point; starlette + uvicorn would need two packages and a third (httpx) for
the client.

Rows are parsed by `parse_text_rows`, one adapter over the export's row
parser (`dlrm_jax.serving.runtime.parse_rows`), so a stricter shared parser
can replace it in one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import signal
import socket
import sys
from typing import Any, Callable, Sequence

import numpy as np

from dlrm_jax import cli
from dlrm_jax.serving import runtime as export_runtime

NUM_INT, NUM_CAT = export_runtime.NUM_INT, export_runtime.NUM_CAT
INPUTS = export_runtime.INPUTS


class BadRequest(ValueError):
  """A malformed request.

  Attributes:
    row: the index of the offending row, or None.
  """

  def __init__(self, message: str, row: int | None = None):
    super().__init__(message)
    self.row = row


# ----------------------------------------------------------------------------
# Request parsing.


def parse_text_rows(lines: Sequence[str]) -> dict[str, np.ndarray]:
  """Parses Criteo text lines into the export's inputs.

  It uses the strict row parser that training and `predict` use,
  `export_runtime.parse_rows_checked`.

  Args:
    lines: the request's "rows", one Criteo line each.

  Returns:
    {'int', 'cat', 'cat_present'} arrays.

  Raises:
    BadRequest: a line is not a string or is malformed. It names the first
      bad line's index, and the message lists up to five.
  """
  for i, line in enumerate(lines):
    if not isinstance(line, str):
      raise BadRequest(f'rows[{i}] must be a string, got'
                       f' {type(line).__name__}.', i)
  inputs, errors = export_runtime.parse_rows_checked(list(lines), first_row=0)
  bad = [(i, e) for i, e in enumerate(errors) if e is not None]
  if not bad:
    return inputs
  def one(i, e):
    """Words one bad row's error as `rows[i]: reason`.

    Args:
      i: the row's index.
      e: the parser's error.

    Returns:
      The message.
    """
    prefix = f'row {i}: '
    return f'rows[{i}]: {e[len(prefix):] if e.startswith(prefix) else e}'
  more = f' (and {len(bad) - 5} more bad rows)' if len(bad) > 5 else ''
  raise BadRequest('; '.join(one(i, e) for i, e in bad[:5]) + more, bad[0][0])


_INT32 = (-2**31, 2**31 - 1)


def parse_instances(instances: Sequence[Any]) -> dict[str, np.ndarray]:
  """Parses feature dicts into the export's inputs.

  Args:
    instances: one dict per row. `int_<i>` is a 32-bit integer. `cat_<j>` is
      a hex string of at most 8 digits, Criteo's text form, so "12345" is
      0x12345. Or it is an unsigned 32-bit integer, the value itself, so
      12345 is 12345. Absent or null features are missing: int 0, cat not
      present.

  Returns:
    {'int', 'cat', 'cat_present'} arrays.

  Raises:
    BadRequest: a bad value. It names the row and the feature.
  """
  n = len(instances)
  ints = np.zeros((n, NUM_INT), np.int32)
  cat = np.zeros((n, NUM_CAT), np.uint32)
  present = np.zeros((n, NUM_CAT), bool)
  for i, inst in enumerate(instances):
    if not isinstance(inst, dict):
      raise BadRequest(f'instances[{i}] must be an object of features, got'
                       f' {type(inst).__name__}.', i)
    for key, v in inst.items():
      kind, _, idx = key.partition('_')
      if kind not in ('int', 'cat') or not idx.isdigit() or int(idx) >= (
          NUM_INT if kind == 'int' else NUM_CAT):
        raise BadRequest(
            f'instances[{i}]: unknown feature {key!r}; features are int_0 ..'
            f' int_{NUM_INT - 1} and cat_0 .. cat_{NUM_CAT - 1}.', i)
      j = int(idx)
      if v is None:
        continue
      if kind == 'int':
        if isinstance(v, bool) or not isinstance(v, int) or not (
            _INT32[0] <= v <= _INT32[1]):
          raise BadRequest(
              f'instances[{i}].{key} ({v!r}) must be a 32-bit integer or'
              ' null.', i)
        ints[i, j] = v
      else:
        if isinstance(v, str):
          if not v:
            continue
          try:
            value = int(v, 16)
          except ValueError:
            value = -1
          if len(v) > 8 or value < 0:
            raise BadRequest(
                f'instances[{i}].{key} ({v!r}) must be a hex hash of at most'
                ' 8 digits.', i)
        elif isinstance(v, int) and not isinstance(v, bool) and (
            0 <= v < 2**32):
          value = v
        else:
          raise BadRequest(
              f'instances[{i}].{key} ({v!r}) must be a hex string, an'
              ' unsigned 32-bit integer or null.', i)
        cat[i, j] = value
        present[i, j] = True
  return {'int': ints, 'cat': cat, 'cat_present': present}


def parse_request(body: bytes, max_rows: int, encoder=None
                  ) -> dict[str, np.ndarray]:
  """Parses a /score request body into the export's inputs.

  Args:
    body: the request body, JSON with "rows" or "instances".
    max_rows: the most rows one request may hold.
    encoder: for a tabular export, its `columns.ColumnEncoder`: the body
      then holds "instances" keyed by column name.

  Returns:
    {'int', 'cat', 'cat_present'} arrays.

  Raises:
    BadRequest: the body is not such JSON, holds no rows or too many, or
      holds a bad row.
  """
  try:
    req = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadRequest(f'the body is not valid JSON: {e}.') from e
  if not isinstance(req, dict) or len(
      {'rows', 'instances'} & set(req)) != 1:
    raise BadRequest(
        'the body must be a JSON object with either "rows" (Criteo lines) or'
        ' "instances" (feature objects).')
  key = 'rows' if 'rows' in req else 'instances'
  items = req[key]
  if not isinstance(items, list) or not items:
    raise BadRequest(f'"{key}" must be a non-empty list.')
  if len(items) > max_rows:
    raise BadRequest(
        f'"{key}" has {len(items)} entries; at most {max_rows} per request.')
  if encoder is not None:
    if key == 'rows':
      raise BadRequest(
          'this export reads columns by name: send "instances", objects keyed'
          f' by column ({", ".join(encoder.columns[:4])}, ...), not "rows".')
    from dlrm_jax.serving import columns as columns_lib  # pylint: disable=g-import-not-at-top
    try:
      return encoder.encode(items)
    except columns_lib.ColumnError as e:
      raise BadRequest(str(e), e.row) from e
  return parse_text_rows(items) if key == 'rows' else parse_instances(items)


def _num_rows(inputs: dict[str, np.ndarray]) -> int:
  """B, the rows of a batch of inputs."""
  return len(next(iter(inputs.values())))


# ----------------------------------------------------------------------------
# Scoring and batching.


def padded_scorer(model: export_runtime.LoadedModel
                  ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """Makes a scorer that takes any batch size B.

  A symbolic-batch export gets batches padded to a power of two, so few
  shapes compile. A fixed-batch export gets batches split and padded to its
  batch size.

  Args:
    model: the loaded export.

  Returns:
    `score(inputs)`, which returns `[B]` probabilities.
  """
  fixed = model.signature.get('batch_size')
  table = getattr(model, 'is_table', False)

  def pad(x, n):
    """Pads an array with zero rows to `n` rows.

    Args:
      x: the array.
      n: the rows wanted.

    Returns:
      The padded array, or `x` when it has `n` rows already.
    """
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:],
                                       x.dtype)]) if n > len(x) else x

  def score(inputs):
    """Scores a batch of any size.

    Args:
      inputs: {'int', 'cat', 'cat_present'} arrays of B rows, or a tabular
        export's columns.

    Returns:
      The probabilities, `[B]`.
    """
    n = _num_rows(inputs)
    if table:
      call = lambda part: model.scores_columns(part)
    else:
      call = lambda part: model.scores(*(part[k] for k in INPUTS))
    if fixed:
      out = []
      for a in range(0, n, fixed):
        part = {k: pad(v[a:a + fixed], fixed) for k, v in inputs.items()}
        out.append(call(part)[:min(fixed, n - a)])
      return np.concatenate(out)
    size = max(8, 1 << (n - 1).bit_length())
    return call({k: pad(v, size) for k, v in inputs.items()})[:n]

  return score


@dataclasses.dataclass
class _Item:
  inputs: dict[str, np.ndarray]
  future: asyncio.Future


class Batcher:
  """Queues requests and scores them in batches of up to `max_batch` rows.

  After the first request of a batch, it waits at most `max_wait_s` for more.
  A request is never split. One larger than `max_batch` is scored alone.

  Attributes:
    score: the scorer, run in a worker thread.
    max_batch: the most rows of a batch.
    max_wait_s: how long a batch waits for more requests.
    batches: the batches scored so far.
    rows: the rows scored so far.
  """

  def __init__(self, score: Callable[[dict[str, np.ndarray]], np.ndarray],
               max_batch: int = 256, max_wait_s: float = 0.002):
    self.score = score
    self.max_batch = max_batch
    self.max_wait_s = max_wait_s
    self.batches = 0
    self.rows = 0
    self._queue: asyncio.Queue[_Item] = asyncio.Queue()
    self._pool = concurrent.futures.ThreadPoolExecutor(1, 'dlrm-score')
    self._task: asyncio.Task | None = None
    self._held: _Item | None = None

  def start(self) -> None:
    """Starts the batching task on the running event loop."""
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def submit(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Queues a request's rows and waits for their scores.

    Args:
      inputs: {'int', 'cat', 'cat_present'} arrays of the request.

    Returns:
      The request's probabilities.
    """
    fut = asyncio.get_running_loop().create_future()
    await self._queue.put(_Item(inputs, fut))
    return await fut

  async def _next_batch(self) -> list[_Item]:
    loop = asyncio.get_running_loop()
    first = self._held or await self._queue.get()
    self._held = None
    batch, rows = [first], _num_rows(first.inputs)
    deadline = loop.time() + self.max_wait_s
    while rows < self.max_batch:
      timeout = deadline - loop.time()
      try:
        item = (self._queue.get_nowait() if timeout <= 0 else
                await asyncio.wait_for(self._queue.get(), timeout))
      except (asyncio.TimeoutError, asyncio.QueueEmpty):
        break
      n = _num_rows(item.inputs)
      if rows + n > self.max_batch:
        self._held = item  # opens the next batch
        break
      batch.append(item)
      rows += n
    return batch

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._next_batch()
      inputs = {k: np.concatenate([it.inputs[k] for it in batch])
                for k in batch[0].inputs}
      try:
        scores = await loop.run_in_executor(self._pool, self.score, inputs)
      except Exception as e:  # pylint: disable=broad-except
        for it in batch:
          if not it.future.done():
            it.future.set_exception(e)
        continue
      self.batches += 1
      self.rows += len(scores)
      start = 0
      for it in batch:
        n = _num_rows(it.inputs)
        if not it.future.done():
          it.future.set_result(scores[start:start + n])
        start += n

  async def close(self) -> None:
    """Stops the batching task and the worker thread."""
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------
# The HTTP application.


def make_app(batcher: Batcher, *, max_request_rows: int = 4096,
             max_body_bytes: int = 16 << 20, info: dict | None = None,
             encoder=None):
  """Builds the aiohttp application: /health and /score over `batcher`.

  Args:
    batcher: the batcher that scores the requests.
    max_request_rows: the most rows one request may hold.
    max_body_bytes: the largest request body.
    info: extra fields for /health.
    encoder: a tabular export's `columns.ColumnEncoder`, or None.

  Returns:
    The `aiohttp.web.Application`.
  """
  from aiohttp import web  # pylint: disable=g-import-not-at-top

  state = {'draining': False}

  async def health(request):
    del request
    if state['draining']:
      return web.json_response({'status': 'shutting down'}, status=503)
    return web.json_response(dict(info or {}, status='ok',
                                  batches=batcher.batches, rows=batcher.rows,
                                  max_batch=batcher.max_batch))

  async def score(request):
    try:
      inputs = parse_request(await request.read(), max_request_rows,
                             encoder)
    except BadRequest as e:
      body = {'error': str(e)}
      if e.row is not None:
        body['row'] = e.row
      return web.json_response(body, status=400)
    probs = await batcher.submit(inputs)
    return web.json_response({'probabilities': [float(p) for p in probs]})

  async def on_startup(app):
    del app
    batcher.start()

  async def on_shutdown(app):
    del app
    state['draining'] = True

  async def on_cleanup(app):
    del app
    await batcher.close()

  app = web.Application(client_max_size=max_body_bytes)
  app.add_routes([web.get('/health', health), web.post('/score', score)])
  app.on_startup.append(on_startup)
  app.on_shutdown.append(on_shutdown)
  app.on_cleanup.append(on_cleanup)
  app['state'] = state
  return app


async def serve(export_dir: str, *, host: str = '127.0.0.1', port: int = 0,
                max_batch: int = 256, max_wait_ms: float = 2.0,
                max_request_rows: int = 4096,
                ready: Callable[[int], None] | None = None,
                stop: asyncio.Event | None = None,
                progress: Callable[[str], None] | None = None,
                handle_signals: bool = True) -> None:
  """Serves an export until SIGTERM or SIGINT, or until `stop` is set.

  Args:
    export_dir: the export directory.
    host: where to listen.
    port: the port. 0 takes any free port.
    max_batch: the most rows of a scored batch.
    max_wait_ms: how long a batch waits for more requests.
    max_request_rows: the most rows one request may hold.
    ready: called with the port once the server accepts connections.
    stop: an event that stops the server, for embedding it in a program.
    progress: called with a line at each start-up stage: loading, compiling.
    handle_signals: whether SIGTERM and SIGINT set `stop`. That works in the
      main thread only. Turn it off for a server run in another thread.

  Raises:
    ValueError: the directory holds no dlrm_jax export.
  """
  from aiohttp import web  # pylint: disable=g-import-not-at-top

  progress = progress or (lambda line: None)
  progress(f'loading the export {export_dir}')
  model = export_runtime.load_export(export_dir)
  score = padded_scorer(model)
  encoder = None
  if model.is_table:
    from dlrm_jax.serving import columns as columns_lib  # pylint: disable=g-import-not-at-top
    progress('loading the side tables')
    encoder = columns_lib.ColumnEncoder.from_export(export_dir,
                                                    model.signature)
  batcher = Batcher(score, max_batch=max_batch, max_wait_s=max_wait_ms / 1e3)
  # Compile the shapes the batcher uses before taking traffic.
  if model.is_table:
    warm = {k: np.zeros((1,) + tuple(s[1:]), d) for k, s, d in model.inputs}
  else:
    warm = {k: np.zeros((1,) + s, d) for k, s, d in (
        ('int', (NUM_INT,), np.int32), ('cat', (NUM_CAT,), np.uint32),
        ('cat_present', (NUM_CAT,), bool))}
  size = 1
  progress('compiling the batch sizes the server uses (up to'
           f' {model.signature.get("batch_size") or max_batch} rows)')
  while True:
    score({k: np.repeat(v, size, 0) for k, v in warm.items()})
    if size >= max_batch or model.signature.get('batch_size'):
      break
    size *= 2
  app = make_app(batcher, max_request_rows=max_request_rows,
                 info={'export': export_dir,
                       'quantize': model.signature.get('quantize')},
                 encoder=encoder)
  runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=30.0)
  await runner.setup()
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  site = web.SockSite(runner, sock)
  await site.start()
  stop = stop or asyncio.Event()
  loop = asyncio.get_running_loop()
  signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
  for sig in signals:
    loop.add_signal_handler(sig, stop.set)
  if ready is not None:
    ready(sock.getsockname()[1])
  try:
    await stop.wait()
  finally:
    for sig in signals:
      loop.remove_signal_handler(sig)
    await runner.cleanup()  # stops listening, finishes in-flight requests


def read_url(stdout) -> str:
  """Reads the URL a started `python -m dlrm_jax.serve` prints.

  Args:
    stdout: the server's stdout, a text stream. The start-up lines before
      the URL are skipped.

  Returns:
    The URL.

  Raises:
    RuntimeError: the output ends before the server listens.
  """
  seen = []
  for line in stdout:
    if line.startswith('serving ') and ' on http' in line:
      return line.rsplit(' on ', 1)[1].strip()
    seen.append(line.strip())
  raise RuntimeError(f'the server did not start: {" / ".join(seen)[-2000:]}')


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m dlrm_jax.serve`.

  Args:
    argv: the arguments. Default: sys.argv.

  Returns:
    The exit status, 0 after a clean shutdown.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog='python -m dlrm_jax.serve',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--export', required=True, help='the export directory')
  p.add_argument('--host', default='127.0.0.1')
  p.add_argument('--port', type=int, default=8080,
                 help='0: any free port (printed)')
  p.add_argument('--max_batch', type=int, default=256,
                 help='rows per scored batch')
  p.add_argument('--max_wait_ms', type=float, default=2.0,
                 help='how long a batch waits for more requests')
  p.add_argument('--max_request_rows', type=int, default=4096)
  args = p.parse_args(argv)
  args.export = cli.absolute(args.export)  # relative to the current directory
  for name in ('max_batch', 'max_request_rows'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} ({getattr(args, name)}) must be positive.')
  if args.max_wait_ms < 0:
    p.error(f'--max_wait_ms ({args.max_wait_ms}) must be >= 0.')

  def ready(port):
    """Prints the URL the server listens on.

    Args:
      port: the port.
    """
    print(f'serving {args.export} on http://{args.host}:{port}', flush=True)

  asyncio.run(serve(args.export, host=args.host, port=args.port,
                    max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    max_request_rows=args.max_request_rows, ready=ready,
                    progress=lambda line: print(line, flush=True)))
  print('shut down', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
