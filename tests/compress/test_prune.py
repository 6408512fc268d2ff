"""Pruning: scheduled sparsity, exact masks, pruned weights stay zero through updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import compress
from kdjax import models


def test_schedule_is_zhu_gupta_cubic():
  sched = compress.sparsity_schedule(0.9, begin_step=10, end_step=110)
  for t in (0, 10, 35, 60, 109, 110, 500):
    frac = min(max((t - 10) / 100, 0.0), 1.0)
    expected = 0.9 + (0.0 - 0.9) * (1 - frac) ** 3
    assert float(sched(t)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_sparsity_outside_unit_interval_is_an_error(bad):
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    compress.sparsity_schedule(bad, end_step=10)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    compress.prune_params({"k": jnp.ones((2, 2))}, bad)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    compress.prune(bad)


def test_unstructured_mask_hand_made():
  w = jnp.array([[0.1, -5.0, 0.3], [-0.2, 4.0, 0.05]])
  m = compress.kernel_mask(w, 0.5)          # floor(0.5 * 6) = 3 smallest |w|
  np.testing.assert_array_equal(np.asarray(m), [[0, 1, 1], [0, 1, 0]])
  m = jax.jit(compress.kernel_mask)(w, jnp.float32(1 / 3))  # floor(2) -> 2
  np.testing.assert_array_equal(np.asarray(m), [[0, 1, 1], [1, 1, 0]])


def test_structured_mask_prunes_whole_output_channels_and_biases():
  k = np.ones((2, 2, 3, 4), np.float32) * np.array([3.0, 0.1, 2.0, 0.5])
  params = {"conv": {"kernel": jnp.asarray(k), "bias": jnp.arange(1.0, 5.0)}}
  pruned = compress.prune_params(params, 0.5, structured=True)
  # the two channels of smallest L2 norm (1 and 3) are zero, with their bias
  alive = np.asarray(jnp.abs(pruned["conv"]["kernel"]).sum((0, 1, 2)) > 0)
  np.testing.assert_array_equal(alive, [True, False, True, False])
  np.testing.assert_array_equal(np.asarray(pruned["conv"]["bias"]), [1, 0, 3, 0])


@pytest.mark.parametrize("structured", [False, True])
def test_masks_follow_schedule_and_stay_zero_through_updates(structured):
  model = models.MLP(hidden=(32,), num_classes=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 10)),
                  jnp.float32)
  y = jnp.arange(16) % 4
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  sched = compress.sparsity_schedule(0.75, begin_step=2, end_step=12)
  # weight decay and momentum would revive pruned weights without the mask
  opt = optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                    compress.prune(sched, structured=structured))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean())(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(15):
    params, state = step(params, state)
    masks = compress.current_masks(state)
    target = float(sched(t))
    for name in ("dense_0", "head"):
      kernel = np.asarray(params[name]["kernel"])
      mask = np.asarray(masks[name]["kernel"])
      # pruned weights are exactly 0 after the update
      assert np.all(kernel[mask == 0] == 0)
      if structured:
        n_out = kernel.shape[-1]
        dead = np.sum(np.all(kernel == 0, axis=0))
        assert dead == np.floor(target * n_out + 1e-6)
      else:
        assert np.sum(mask == 0) == np.floor(target * kernel.size + 1e-6)
  assert compress.sparsity_of(params) == pytest.approx(0.75, abs=0.02)
  # biases are never pruned in unstructured mode
  if not structured:
    assert np.all(np.asarray(masks["dense_0"]["bias"]) == 1)


def test_prune_touches_only_the_student_in_a_train_state_tree():
  tree = {"student": {"k": jnp.arange(1.0, 9.0).reshape(2, 4)},
          "loss": {"connector": {"kernel": jnp.ones((2, 2))}}}
  masks = compress.compute_masks(tree, 0.5)
  assert float(jnp.sum(masks["student"]["k"])) == 4.0
  assert float(masks["loss"]["connector"]["kernel"]) == 1.0


def test_exclude_keeps_the_classifier_dense():
  params = {"dense_0": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3),
                        "bias": jnp.ones(3)},
            "head": {"kernel": jnp.arange(1.0, 7.0).reshape(3, 2),
                     "bias": jnp.ones(2)}}
  pruned = compress.prune_params(params, 0.5, structured=True,
                                 exclude=("head",))
  np.testing.assert_array_equal(np.asarray(pruned["head"]["kernel"]),
                                np.asarray(params["head"]["kernel"]))
  # dense_0: floor(0.5 * 3) = 1 output neuron (the smallest norm: column 0)
  np.testing.assert_array_equal(np.asarray(pruned["dense_0"]["kernel"]),
                                [[0, 2, 3], [0, 5, 6]])
  np.testing.assert_array_equal(np.asarray(pruned["dense_0"]["bias"]), [0, 1, 1])
  assert compress.sparsity_of(pruned, exclude=("head",)) == pytest.approx(1 / 3)
