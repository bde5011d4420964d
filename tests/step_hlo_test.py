"""What the compiled train step does with the embeddings (issue 24).

Read from the optimized HLO of the real train step at the shape of
`benchmarks.step_breakdown` (the reference DLRM: dense arch, dot
interaction, no sparse input to the over arch, SGD), made small (batch 64,
26 tables of 1,000 x 8): the `[B, N + 1, D]` stack of the dense arch output
and the pooled embeddings is never formed, no `[B, D, N]` transposed copy
feeds the interaction, and the table rows are gathered in a fusion whose
root is the validity mask's multiply (one vectorised row copy per id on
XLA:CPU), not a bare gather or a select per element.
"""

import re

from absl.testing import absltest
import numpy as np

from benchmarks import step_shape
from dlrm_jax.train import trainer as trainer_lib
from tests import reference


def _fused_computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  out, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^%?([\w.\-]+) .*\{$', line)
    if m and not line.startswith(' '):
      name = m.group(1)
      out[name] = []
    elif name is not None and line.startswith('  '):
      out[name].append(line)
  return out


class StepHloTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = step_shape.config_for(1000, batch=64, dim=8)
    cls.trainer = trainer_lib.Trainer(config,
                                      mesh=reference.single_device_mesh())
    t = cls.trainer
    state = t.init_state(0)
    b = config.batch_size
    rng = np.random.default_rng(0)
    batch = t.put_batch({
        'dense': rng.normal(size=(b, 13)).astype(np.float32),
        'ids': rng.integers(0, 1000, (b, 26)).astype(np.int32),
        'label': (rng.random(b) < 0.5).astype(np.float32),
    })
    cls.hlo = t.train_step.lower(state, batch, t.zero_metrics()).compile(
    ).as_text()
    cls.b, cls.n, cls.d = b, 26, config.features['cat_0'].embedding_dim

  def test_no_stack_and_no_transposed_copy(self):
    b, n, d = self.b, self.n, self.d
    for shape in (f'[{b},{n + 1},{d}]', f'[{b},{d},{n}]',
                  f'[{b},{d},{n + 1}]'):
      self.assertFalse(f'f32{shape}' in self.hlo,
                       f'the step forms an f32{shape} array')

  def test_rows_are_gathered_under_the_mask(self):
    # A fusion that gathers rows of a [C, D] table must end in elementwise
    # math (the mask's multiply, or the optimizer's), never in the gather
    # itself, a copy of it, a select per element or a concatenation (the
    # stack, before issue 24): XLA:CPU emits those
    # without vectorising (`benchmarks.step_breakdown`).
    roots = []
    for lines in _fused_computations(self.hlo).values():
      shapes = {}
      for l in lines:
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]', l)
        if m:
          shapes[m.group(1)] = tuple(int(x) for x in m.group(2).split(',') if x)
      tables = [l for l in lines if ' gather(' in l and shapes.get(
          re.search(r'gather\(%([\w.\-]+)', l).group(1), (0, 0))[1:] == (
              self.d,) and shapes.get(re.search(
                  r'gather\(%([\w.\-]+)', l).group(1))[0] > 10 * self.b]
      if tables:
        root = next(l for l in lines if l.lstrip().startswith('ROOT'))
        roots.append(re.search(r'= \S+ ([\w\-]+)\(', root).group(1))
    self.assertNotEmpty(roots, 'no gather of table rows found in the step')
    bad = [r for r in roots
           if r in ('gather', 'bitcast', 'copy', 'select', 'concatenate')]
    self.assertEmpty(bad, f'table rows gathered in fusions rooted at {roots}')


if __name__ == '__main__':
  absltest.main()
