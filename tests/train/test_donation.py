"""The train step donates its state: the arrays the user passed to create_state survive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import losses
from kdjax import models
from kdjax import train

B, F, C = 4, 3, 5


def linear(params, x):
  return x @ params["w"] + params["b"]


APPLY = models.from_function(linear)


def device_vars(seed):
  """Student/teacher variables as *device* arrays (the ones donation can delete)."""
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(F, C)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32)},
          "stats": {"count": jnp.zeros((), jnp.float32)}}


def batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(B, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(B,)).astype(np.int32)}


def loss_fn():
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.5, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), 0.5)],
      temperature=2.0)


def _assert_usable(tree):
  for leaf in jax.tree.leaves(tree):
    assert not leaf.is_deleted()
    np.asarray(leaf)  # raises "Array has been deleted" if donated


def test_user_rng_and_variables_survive_a_donating_step():
  opt = optax.sgd(0.1)
  key = jax.random.key(0)
  variables = device_vars(1)
  expected = jax.tree.map(np.asarray, variables)
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  state = train.create_state(variables, opt, rng=key)
  state, _ = step(state, device_vars(2), batch())
  state, _ = step(state, device_vars(2), batch())
  # The key and the variables are still the user's, unchanged.
  jax.random.normal(key, (2,))
  _assert_usable(variables)
  jax.tree.map(np.testing.assert_array_equal, expected,
               jax.tree.map(np.asarray, variables))
  # ... and can start a second, identical run.
  again = train.create_state(variables, opt, rng=key)
  again, _ = step(again, device_vars(2), batch())
  again, _ = step(again, device_vars(2), batch())
  jax.tree.map(np.testing.assert_array_equal, state.params, again.params)


def test_loss_params_and_state_survive_a_donating_step():
  opt = optax.sgd(0.1)
  loss_params = {"kd": {"scale": jnp.ones((), jnp.float32)}}
  loss_state = {"kd": {"seen": jnp.zeros((), jnp.int32)}}
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  state = train.create_state(device_vars(1), opt, rng=jax.random.key(0),
                             loss_params=loss_params, loss_state=loss_state)
  step(state, device_vars(2), batch())
  _assert_usable((loss_params, loss_state))


def test_legacy_uint32_key_and_mixed_precision_params_survive():
  opt = optax.sgd(0.1)
  key = jax.random.PRNGKey(0)
  variables = device_vars(1)
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt,
                               policy=train.Policy.bf16())
  state = train.create_state(variables, opt, rng=key,
                             policy=train.Policy.bf16())
  step(state, device_vars(2), batch())
  _assert_usable((key, variables))


def test_copy_false_hands_the_arrays_over():
  opt = optax.sgd(0.1)
  variables = device_vars(1)
  state = train.create_state(variables, opt, rng=jax.random.key(0),
                             copy=False)
  assert state.params["w"] is variables["params"]["w"]
