"""Native NNX modules (`bireal_jax.nnx`) against the Linen models on the same variables.

Tiny models (small stem, width 4, 8 px, batch 2-4; fewer blocks per stage than the registered
depths where noted) keep every comparison to a few compilations.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bireal_jax.nnx as bnnx
from bireal_jax import convert, deploy, layers, models

TINY = dict(num_classes=4, base_width=4, stem="small")
# (registered name, overrides). bireal18: every stage, a plain block, stride-2 blocks with their
# downsample shortcuts. bireal50 in two stages: the real first block, a plain block, and a
# stride-2 block with `down_conv1x1`, the avg-pooled middle shortcut and `downsample`.
CASES = {
    "bireal18": ("bireal18", dict(TINY, stage_sizes=(1, 1, 1, 1))),
    "bireal50": ("bireal50", dict(TINY, stage_sizes=(2, 1))),
    "bireal18_real": ("bireal18_real", dict(TINY, stage_sizes=(1, 1, 1, 1))),
}


def _key(seed):
  # rbg keys: init compiles/runs in ~1 s instead of ~15 s with threefry on this CPU.
  return jax.random.key(seed, impl="rbg")


def _rngs(seed):
  return nnx.Rngs(params=_key(seed))


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _np(tree):
  return jax.tree.map(np.asarray, dict(tree))


def _random_variables(module, x, seed=0):
  """Linen variables of `module` (shapes from `init`, traced only), every leaf random: binary
  kernels of both signs, BN scales/biases away from 1/0, running statistics not 0/1."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    leaf = path[-1].key
    if leaf in ("var", "scale"):
      a = rng.uniform(0.5, 1.5, s.shape)
    elif leaf in ("mean", "bias"):
      a = 0.1 * rng.standard_normal(s.shape)
    else:  # kernels
      a = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    return a.astype(s.dtype)

  return _np(jax.tree_util.tree_map_with_path(draw, dict(shapes)))


def _sig(tree):
  """(shape, dtype) of every leaf: arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), dict(tree))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  a, b = _np(a), _np(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=rtol, atol=atol), a, b)


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def _nnx_forward(model, x):
  return model(x)


@nnx.jit
def _nnx_loss_and_grads(model, x, labels):
  def loss_fn(m):
    logits = m(x)
    return _ce(logits, labels), logits
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, logits, grads


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_gradients_and_batch_stats_as_linen(case):
  name, kw = CASES[case]
  module = models.get(name, **kw)
  x, labels = _x(2, 8, 8, 3), jnp.array([0, 3])
  v = _random_variables(module, x)
  model = bnnx.from_linen(module, v)
  assert isinstance(model, nnx.Module) and isinstance(model, bnnx.BiRealNet)
  tol = dict(rtol=1e-5, atol=1e-6)

  # Eval mode: running statistics.
  model.eval()
  ref = jax.jit(module.apply)(v, x)
  out = _nnx_forward(model, x)
  assert out.dtype == ref.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, **tol)
  _assert_trees_close(bnnx.to_linen_variables(model), v, rtol=0, atol=0)  # eval leaves stats

  # Train mode: batch statistics, gradients through them, updated running statistics.
  @jax.jit
  def linen_loss_and_grads(variables):
    def loss_fn(params):
      logits, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, train=True, mutable=["batch_stats"])
      return _ce(logits, labels), (logits, upd["batch_stats"])
    return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

  (ref_loss, (ref_logits, ref_stats)), ref_grads = linen_loss_and_grads(v)
  model.train()
  loss, logits, grads = _nnx_loss_and_grads(model, x, labels)
  np.testing.assert_allclose(logits, ref_logits, **tol)
  np.testing.assert_allclose(loss, ref_loss, **tol)
  grads = nnx.to_pure_dict(grads)
  _assert_trees_close(grads, ref_grads, **tol)
  assert np.mean([bool(np.any(g != 0)) for g in jax.tree.leaves(grads)]) > 0.9
  new = bnnx.to_linen_variables(model)
  _assert_trees_close(new["batch_stats"], ref_stats, **tol)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                          _np(new["batch_stats"]), v["batch_stats"])))
  _assert_trees_close(new["params"], v["params"], rtol=0, atol=0)  # a forward moves no param


def test_nnx_init_has_the_linen_tree_and_round_trips():
  x = _x(2, 8, 8, 3)
  for name, kw in CASES.values():
    module = models.get(name, **kw)
    model = bnnx.get(name, rngs=_rngs(3), **kw)
    want = jax.eval_shape(module.init, jax.random.key(0), x)
    assert _sig(bnnx.to_linen_variables(model)) == _sig(want), name

    # Linen -> NNX -> Linen is the identity, into a fresh model and into an initialised one.
    v = _random_variables(module, x, seed=5)
    back = bnnx.to_linen_variables(bnnx.from_linen(module, v))
    _assert_trees_close(back, v, rtol=0, atol=0)
    assert bnnx.from_linen_variables(model, v) is model
    _assert_trees_close(bnnx.to_linen_variables(model), v, rtol=0, atol=0)
    assert all(isinstance(a, jax.Array)
               for a in jax.tree.leaves(bnnx.to_linen_variables(model)))
    # And the options come back.
    assert models.to_config(bnnx.to_linen(model)) == models.to_config(module)
    assert bnnx.to_config(model) == models.to_config(module)


def _linen_shapes(name):
  return jax.eval_shape(models.get(name).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


@pytest.mark.parametrize("name", ["bireal18", "bireal34", "bireal50", "bireal18_real"])
def test_full_size_models_have_the_linen_variables(name):
  got = nnx.eval_shape(lambda: bnnx.get(name))
  assert _sig(bnnx.to_linen_variables(got)) == _sig(_linen_shapes(name))


def test_bireal152_loads_linen_variables():
  # Abstract build + load (no random init): from_linen_variables checks every path and shape.
  want = _linen_shapes("bireal152")
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), want)
  model = bnnx.from_linen(models.get("bireal152"), zeros)
  assert _sig(bnnx.to_linen_variables(model)) == _sig(want)
  assert sum(isinstance(m, bnnx.BiRealBottleneck)
             for _, m in nnx.iter_modules(model)) == 3 + 8 + 36 + 3


def test_mode_switching_and_view():
  model = bnnx.get("bireal18", rngs=_rngs(0), **CASES["bireal18"][1])
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, bnnx.BatchNorm)]
  assert len(bns) == 1 + 4 + 3  # stem, one per block, one per downsample shortcut
  assert not any(bn.use_running_average for bn in bns)  # NNX default: training
  model.eval()
  assert all(bn.use_running_average for bn in bns)
  model.train()
  assert not any(bn.use_running_average for bn in bns)
  view = nnx.view(model, use_running_average=True)
  assert all(m.use_running_average for _, m in nnx.iter_modules(view)
             if isinstance(m, bnnx.BatchNorm))
  assert not any(bn.use_running_average for bn in bns)  # the original is untouched


def test_optimizer_step_matches_linen_and_the_loss_goes_down():
  name, kw = CASES["bireal18"]
  module = models.get(name, **kw)
  images = _x(4, 8, 8, 3, seed=2)
  labels = jnp.arange(4) % 4
  v = _random_variables(module, images, seed=1)
  model = bnnx.from_linen(module, v)
  tx = optax.adam(1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(lambda m: _ce(m(images), labels))(model)
    optimizer.update(model, grads)
    return loss

  loss0 = train_step(model, optimizer, images, labels)

  @jax.jit
  def linen_step(variables, opt_state):
    def loss_fn(params):
      logits, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 images, train=True, mutable=["batch_stats"])
      return _ce(logits, labels), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return loss, {"params": optax.apply_updates(variables["params"], updates), **upd}

  ref_loss, ref = linen_step(v, tx.init(v["params"]))
  np.testing.assert_allclose(loss0, ref_loss, rtol=1e-5)
  _assert_trees_close(bnnx.to_linen_variables(model), ref, rtol=1e-5, atol=1e-6)

  losses = [float(loss0)] + [float(train_step(model, optimizer, images, labels))
                             for _ in range(14)]
  assert int(optimizer.step[...]) == 15
  assert losses[-1] < 0.7 * losses[0], losses
  assert min(losses[-3:]) < min(losses[:3]), losses
  model.eval()
  acc = float(jnp.mean(jnp.argmax(_nnx_forward(model, images), -1) == labels))
  assert np.isfinite(acc)


def _torch_state_dict(name, **overrides):
  """A random official-layout PyTorch state dict (numpy) for `name`, built from the converter's
  own key and layout rules, without torch."""
  block = convert.ARCHS[name][0]
  rng = np.random.default_rng(0)
  sd = {}
  for path, shape in convert.variable_shapes(name, **overrides).items():
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    elif len(shape) == 2:
      shape = shape[::-1]  # [in, out] -> Linear [out, in]
    a = rng.standard_normal(shape).astype(np.float32)
    if path[-1] == "var":
      a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    sd[convert.official_key(path, block)] = a
  return sd


def test_converter_output_loads_into_nnx(tmp_path):
  conv = convert.from_pytorch(_torch_state_dict("bireal18", num_classes=5, base_width=4))
  assert conv.name == "bireal18" and conv.overrides == {"num_classes": 5, "base_width": 4}
  x = _x(2, 16, 16, 3, seed=4)  # ImageNet stem: 16 px -> 4 px after conv1 and the max-pool
  ref = jax.jit(conv.model().apply)(conv.variables, x)

  model = bnnx.from_linen(conv.model(), conv.variables, use_running_average=True)
  np.testing.assert_allclose(_nnx_forward(model, x), ref, rtol=1e-5, atol=1e-5)
  _assert_trees_close(bnnx.to_linen_variables(model), conv.variables, rtol=0, atol=0)

  # The converter's output directory (a float export) -> NNX.
  convert.save(conv, tmp_path)
  exported = deploy.load(tmp_path)
  linen_model, variables = exported.model, exported.variables
  again = bnnx.from_linen(linen_model, variables)
  again.eval()
  np.testing.assert_allclose(_nnx_forward(again, x), ref, rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_path():
  name, kw = CASES["bireal18"]
  model = bnnx.get(name, rngs=_rngs(0), **kw)
  x = _x(2, 8, 8, 3)
  wider = _np(jax.eval_shape(models.get(name, **dict(kw, num_classes=5)).init,
                             jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"'params'.*fc/kernel"):
    bnnx.from_linen_variables(model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wider))
  good = bnnx.to_linen_variables(model)
  with pytest.raises(ValueError, match="unknown variable collection"):
    bnnx.from_linen_variables(model, dict(good, intermediates={}))
  with pytest.raises(ValueError, match="'batch_stats'"):
    bnnx.from_linen_variables(model, {"params": good["params"]})
  with pytest.raises(ValueError, match="channels"):
    model(_x(2, 8, 8, 1))
  with pytest.raises(ValueError, match="block must be"):
    bnnx.BiRealNet((1, 1), block="wide")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_linen_in_both_modes(dtype):
  # float32 trains through ops.batch_norm_train, bfloat16 through bnnx.batch_statistics.
  x = (_x(4, 3, 3, 6, seed=8) * 2 + 1).astype(dtype)
  rng = np.random.default_rng(9)
  lv = {"params": {"scale": rng.uniform(0.5, 1.5, 6).astype(np.float32),
                   "bias": rng.standard_normal(6).astype(np.float32)},
        "batch_stats": {"mean": rng.standard_normal(6).astype(np.float32),
                        "var": rng.uniform(0.5, 1.5, 6).astype(np.float32)}}
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  for use_ra in (True, False):
    bn = bnnx.BatchNorm(6, use_running_average=use_ra, momentum=0.8, epsilon=1e-3, dtype=dtype,
                        rngs=_rngs(0))
    bnnx.from_linen_variables(bn, lv)
    y = bn(x)
    ref, upd = layers.BatchNorm(use_running_average=use_ra, momentum=0.8, epsilon=1e-3,
                                dtype=dtype).apply(lv, x, mutable=["batch_stats"])
    assert y.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), **tol)
    stats = bnnx.to_linen_variables(bn)["batch_stats"]
    _assert_trees_close(stats, upd["batch_stats"], rtol=1e-6, atol=1e-6)
    assert stats["mean"].dtype == jnp.float32


def test_batch_norm_axis_name_matches_linen_under_pmap():
  n = 2
  if jax.local_device_count() < n:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
  x = _x(n, 3, 4, 4, 6, seed=7) * 2 + 1
  bn = bnnx.BatchNorm(6, momentum=0.9, axis_name="batch", rngs=_rngs(0))
  graphdef, state = nnx.split(bn)

  def nnx_fn(state, x):
    m = nnx.merge(graphdef, state)
    return m(x), nnx.state(m, nnx.BatchStat)

  y, stats = jax.pmap(nnx_fn, axis_name="batch", in_axes=(None, 0))(state, x)
  linen = layers.BatchNorm(use_running_average=False, momentum=0.9, axis_name="batch")
  lv = {"params": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
        "batch_stats": {"mean": jnp.zeros(6), "var": jnp.ones(6)}}
  ref_y, ref_upd = jax.pmap(lambda v, x: linen.apply(v, x, mutable=["batch_stats"]),
                            axis_name="batch", in_axes=(None, 0))(lv, x)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  stats = nnx.to_pure_dict(stats)
  _assert_trees_close(stats, ref_upd["batch_stats"], rtol=1e-5, atol=1e-6)
  # Cross-replica statistics: those of the whole batch, the same on every replica.
  flat = np.asarray(x).reshape(-1, 6)
  np.testing.assert_allclose(stats["mean"][0], 0.1 * flat.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["mean"][1], stats["mean"][0])


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_batch_statistics_are_flax_batch_norms(axis_name):
  """Our batch statistics (no flax private API) equal what flax's nn.BatchNorm computes, in
  bfloat16 (promoted to float32) and across a pmapped axis."""
  import flax.linen as nn
  n = 2 if axis_name else 1
  if jax.local_device_count() < n:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
  x = (_x(n, 4, 3, 3, 6, seed=11) * 3 + 2).astype(jnp.bfloat16)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name=axis_name)
  variables = flax_bn.init(jax.random.key(0), x[0])

  def both(x):
    mu, var = bnnx.batch_statistics(x, axis_name=axis_name)
    _, upd = flax_bn.apply(variables, x, mutable=["batch_stats"])  # momentum 0: the batch's
    return mu, var, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

  fn = jax.pmap(both, axis_name=axis_name) if axis_name else jax.vmap(both)
  mu, var, ref_mu, ref_var = fn(x)
  assert mu.dtype == var.dtype == jnp.float32
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(var, ref_var, rtol=1e-6, atol=1e-7)
  flat = np.asarray(x, np.float32).reshape(-1, 6)
  np.testing.assert_allclose(mu[0], flat.mean(0), rtol=1e-5)  # the whole batch's
  np.testing.assert_allclose(var[0], flat.var(0), rtol=1e-4)


def test_import_does_not_import_tensorflow():
  code = ("import sys, bireal_jax.nnx; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
