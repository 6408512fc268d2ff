"""Tests of ModelOutput and the linen / NNX / plain-function adapters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import models


class _Linen(nn.Module):
  """Dense -> BatchNorm -> Dropout -> Dense, sowing one named feature."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(6, name="body")(x)
    self.sow("intermediates", "hidden", h * 2.0)
    h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return nn.Dense(3, name="head")(h)


class _Nnx(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.Linear(4, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.body(x)
    self.sow(nnx.Intermediate, "hidden", h * 2.0)
    return self.head(self.drop(self.bn(h)))


X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


def _linen_setup(**kw):
  module = _Linen()
  variables = module.init(jax.random.PRNGKey(0), X)
  apply = models.from_linen(module, train_kwarg="train", **kw)
  return module, variables, apply


def test_linen_logits_equal_module_apply():
  module, variables, apply = _linen_setup()
  out = apply(variables, {"image": X})
  np.testing.assert_allclose(out.logits, module.apply(variables, X), rtol=1e-6)
  assert out.features == {} and out.state is None


def test_linen_captures_submodule_output_and_sown_value():
  module, variables, apply = _linen_setup(feature_names=("body", "hidden"))
  out = jax.jit(apply)(variables, {"image": X})
  kernel = variables["params"]["body"]["kernel"]
  bias = variables["params"]["body"]["bias"]
  body = X @ np.asarray(kernel) + np.asarray(bias)  # independent reference
  np.testing.assert_allclose(out.features["body"], body, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.features["hidden"], 2 * body, rtol=1e-5,
                             atol=1e-6)


def test_linen_missing_feature_lists_available_names():
  _, variables, apply = _linen_setup(feature_names=("nope",))
  with pytest.raises(KeyError) as e:
    apply(variables, {"image": X})
  message = str(e.value)
  assert "nope" in message and "body" in message and "hidden" in message


def test_linen_train_mode_updates_batch_stats_and_uses_dropout_rng():
  _, variables, apply = _linen_setup()
  out1 = apply(variables, {"image": X}, train=True, rng=jax.random.PRNGKey(1))
  out2 = apply(variables, {"image": X}, train=True, rng=jax.random.PRNGKey(2))
  assert "batch_stats" in out1.state
  # BatchNorm running mean moves towards the batch mean (momentum 0.99).
  h = X @ np.asarray(variables["params"]["body"]["kernel"]) + np.asarray(
      variables["params"]["body"]["bias"])
  np.testing.assert_allclose(out1.state["batch_stats"]["bn"]["mean"],
                             0.01 * h.mean(0), rtol=1e-4, atol=1e-6)
  assert not np.allclose(out1.logits, out2.logits)  # different dropout masks


def test_linen_missing_input_key_is_clear():
  _, variables, apply = _linen_setup()
  with pytest.raises(KeyError, match="image"):
    apply(variables, {"x": X})


def test_nnx_adapter_matches_module_and_captures():
  model = _Nnx(nnx.Rngs(0, dropout=1))
  model.eval()
  # The reference call sows too: under nnx.capture (the current API).
  expected, _ = nnx.capture(model, nnx.Intermediate)(jnp.asarray(X))
  apply, variables = models.from_nnx(model, feature_names=("hidden", "body"))
  out = jax.jit(apply)(variables, {"image": X})
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
  w = np.asarray(variables["params"]["body"]["kernel"].get_value())
  b = np.asarray(variables["params"]["body"]["bias"].get_value())
  np.testing.assert_allclose(out.features["body"], X @ w + b, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out.features["hidden"], 2 * (X @ w + b),
                             rtol=1e-5, atol=1e-6)


def test_nnx_params_are_arguments_and_gradients_flow():
  apply, variables = models.from_nnx(_Nnx(nnx.Rngs(0, dropout=1)))

  def loss(params):
    return jnp.sum(apply({**variables, "params": params}, {"image": X}).logits)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  g = grads["head"]["kernel"].get_value()
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_nnx_train_mode_returns_state_and_missing_name_error():
  apply, variables = models.from_nnx(_Nnx(nnx.Rngs(0, dropout=1)),
                                     feature_names=("nothing",))
  with pytest.raises(KeyError) as e:
    apply(variables, {"image": X})
  assert "hidden" in str(e.value) and "body" in str(e.value)
  apply, variables = models.from_nnx(_Nnx(nnx.Rngs(0, dropout=1)))
  out = apply(variables, {"image": X}, train=True, rng=jax.random.PRNGKey(0))
  mean = out.state["state"]["bn"]["mean"].get_value()
  assert np.abs(np.asarray(mean)).sum() > 0  # running stats moved


def test_from_function_variants():
  w = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)

  def plain(params, x):
    return x @ params

  def with_features(params, x):
    return x @ params, {"input": x}

  out = models.from_function(plain)({"params": w}, {"image": X})
  np.testing.assert_allclose(out.logits, X @ w, rtol=1e-6)
  out = models.from_function(with_features, feature_names=("input",))(
      {"params": w}, {"image": X})
  np.testing.assert_allclose(out.features["input"], X)
  with pytest.raises(KeyError, match="input"):
    models.from_function(with_features, feature_names=("missing",))(
        {"params": w}, {"image": X})
  with pytest.raises(TypeError, match="params"):
    models.from_function(plain)(w, {"image": X})


def test_model_output_is_a_pytree_and_feature_error():
  out = models.ModelOutput(logits=jnp.ones((2, 3)), features={"a": jnp.ones(2)})
  doubled = jax.tree.map(lambda x: 2 * x, out)
  np.testing.assert_allclose(doubled.features["a"], 2.0)
  with pytest.raises(KeyError, match="available features"):
    out.feature("b")


def test_check_finite_output_names_the_teacher():
  bad = models.ModelOutput(logits=jnp.array([[0.0, jnp.nan]]))
  with pytest.raises(FloatingPointError, match="teacher's logits"):
    models.check_finite_output(bad, "teacher")
  models.check_finite_output(models.ModelOutput(logits=jnp.zeros((1, 2))))


@pytest.mark.parametrize("cls,kwargs", [(models.MLP, {"hidden": (16,)}),
                                        (models.CNN, {"channels": (4, 8),
                                                      "dense": 16})])
def test_reference_models_shapes_and_features(cls, kwargs):
  module = cls(num_classes=7, **kwargs)
  x = jnp.zeros((2, 28, 28, 1))
  variables = module.init(jax.random.PRNGKey(0), x)
  names = ("penultimate",) + (("block_1",) if cls is models.CNN else ())
  out = models.from_linen(module, feature_names=names)(variables, {"image": x})
  assert out.logits.shape == (2, 7)
  assert out.features["penultimate"].shape[0] == 2


def test_nnx_batch_stats_are_written_back_by_the_train_step():
  import optax
  from kdjax import losses, train
  apply, variables = models.from_nnx(_Nnx(nnx.Rngs(0, dropout=1)))
  loss = losses.compose([losses.Term("ce", losses.label_term(), 1.0,
                                     needs_teacher=False)])
  opt = optax.sgd(0.1)
  state = train.create_state(jax.tree.map(jnp.copy, variables), opt,
                             rng=jax.random.PRNGKey(0))
  step = train.make_train_step(apply, None, loss, opt)
  batch = {"image": X, "label": np.array([0, 1, 2, 0, 1], np.int32)}
  state, _ = step(state, None, batch)
  before = np.asarray(variables["state"]["bn"]["mean"].get_value())
  after = np.asarray(state.model_state["state"]["bn"]["mean"].get_value())
  assert np.abs(after - before).sum() > 0
