"""Exporting a student as a serialized ``jax.export`` artifact that runs without kdjax.

:func:`export_for_inference` writes, into one directory::

  model.jaxexport   jax.export.export(jax.jit(f))(...).serialize(): StableHLO of
                    f(*arrays, x) -> logits, batch dimension symbolic ("b")
  params.npz        the arrays, in call order (arr_0000, arr_0001, ...)
  export.json       format, input shape/dtype, quantisation, array names, sizes
  run_exported.py   a loader that imports jax and numpy only (not kdjax)

``f`` is the student's forward pass in eval mode (logits only): no loss-term
connectors or heads, no optimizer state. With ``quantize`` the kernels are
stored as int8 (int4 values in an int8 container) with one float32 scale
``s_w[n]`` per output channel ``n``. With activation bits (w8a8, w4a8) and
``compute="int8"`` (the default) every linen ``Dense`` / ``Conv`` runs in
integers inside ``f`` (:mod:`kdjax.compress._int8`)::

  s_x[b] = max|x[b]| / qmax_a,  q_x = clip(round(x / s_x[b]), ±qmax_a)   int8
  y      = s_x[b] s_w[n] · (q_x · q_w)[b, n] + bias[n]     (s8 x s8 -> s32)

(dynamic, one activation scale per example ``b``; convolutions as
``conv_general_dilated`` with int32 accumulation or as im2col + the same
dot, whichever XLA:CPU runs faster); no float copy of those kernels exists
in ``f``. With
``compute="dequantize"`` (and always for weight-only w8 / w4, or a layer the
integer path does not cover) the kernels are dequantised inside ``f``,
``W = q_w s_w``, and the activations fake-quantised as in training
(:func:`kdjax.compress.quantize_apply`): smaller on disk, float speed.
Both equal the fake-quantised training forward up to float rounding.
Loading::

  import run_exported                       # next to the artifact
  predict = run_exported.load(directory)
  logits = predict(images)                  # [B, *input_shape] -> [B, C]

Needs ``flatbuffers`` (jax.export's serializer).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.compress import _int8
from kdjax.compress import _quant

FORMAT = "kdjax-jax-export-v1"
COMPUTES = ("int8", "int8_im2col", "int8_direct_conv", "dequantize")
_CONV = {"int8": "auto", "int8_im2col": "im2col", "int8_direct_conv": "direct"}
ARTIFACT = "model.jaxexport"
PARAMS = "params.npz"
MANIFEST = "export.json"
LOADER = "run_exported.py"

LOADER_SOURCE = '''"""Runs a model exported by `kdjax export` with jax and numpy alone (no kdjax).

  python run_exported.py [EXPORT_DIR] [--input images.npy] [--batch 1]

prints the logits' shape and argmax; in Python::

  predict = load(EXPORT_DIR)
  logits = predict(images)   # float32 [B, *input_shape] -> [B, num_classes]
"""

import argparse
import json
import os

import jax
import numpy as np
from jax import export as jax_export


def load(directory):
  """Returns predict(x) -> logits for the export in `directory`."""
  with open(os.path.join(directory, "export.json")) as f:
    manifest = json.load(f)
  if manifest.get("format") != "kdjax-jax-export-v1":
    raise ValueError(f"{directory}: unknown export format {manifest.get('format')!r}.")
  with open(os.path.join(directory, manifest["artifact"]), "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, manifest["params"])) as stored:
    arrays = [jax.numpy.asarray(stored[name]) for name in manifest["array_keys"]]
  dtype = np.dtype(manifest["input_dtype"])

  def predict(x):
    x = np.asarray(x, dtype)
    expected = tuple(manifest["input_shape"][1:])
    if x.shape[1:] != expected:
      raise ValueError(f"input shape {x.shape}: expected [B, {expected}].")
    return exported.call(*arrays, x)

  predict.manifest = manifest
  return predict


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("directory", nargs="?", default=here)
  p.add_argument("--input", default=None, help=".npy file of inputs [B, ...]")
  p.add_argument("--batch", type=int, default=1)
  args = p.parse_args()
  predict = load(args.directory)
  shape = predict.manifest["input_shape"][1:]
  if args.input:
    x = np.load(args.input)
  else:
    x = np.random.default_rng(0).standard_normal((args.batch, *shape))
  logits = np.asarray(predict(x))
  print("logits", logits.shape, "argmax", logits.argmax(-1).tolist())


if __name__ == "__main__":
  main()
'''


def _dequantize_tree(stored: Any) -> Any:
  """``{"q": int8, "scale": f32}`` nodes -> ``q * scale`` (float32)."""
  def is_q(node):
    return isinstance(node, dict) and set(node) == {"q", "scale"}
  return jax.tree.map(
      lambda n: n["q"].astype(jnp.float32) * n["scale"] if is_q(n) else n,
      stored, is_leaf=is_q)


def quantize_for_storage(params: Any, bits: int) -> Any:
  """Every kernel (floating, ``ndim >= 2``) -> ``{"q": int8, "scale": float32}``.

  ``q = clip(round(w / s), -qmax, qmax)``, ``s = max|w[..., c]| / qmax``
  per output channel ``c`` (the same rounding as :func:`fake_quant`, so a
  QAT-trained student exports to exactly its training-time forward).
  """
  _quant.check_bits(bits)

  def one(w):
    if not _quant._is_kernel(w):  # pylint: disable=protected-access
      return w
    q, s = _quant.quantize_to_int(w, bits, channel_axis=-1)
    return {"q": q, "scale": s}

  return jax.tree.map(one, params)


def _without(tree: Any, paths: Sequence[tuple]) -> Any:
  """``tree`` with ``tree[p0]...[pn]["kernel"]`` removed for every path."""
  if not paths:
    return tree
  out = dict(tree)
  heads = {}
  for p in paths:
    heads.setdefault(p[0] if p else None, []).append(p[1:])
  for head, rest in heads.items():
    if head is None:
      out.pop("kernel", None)
    else:
      out[head] = _without(out[head], rest)
  return out


def _at(tree: Any, path: tuple) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _is_key(x: Any) -> bool:
  """Whether ``x`` is a typed PRNG key array (``jax.random.key``)."""
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def export_for_inference(apply: Callable[..., Any],
                         variables: Any,
                         directory: str,
                         *,
                         input_shape: Sequence[int],
                         input_dtype: Any = jnp.float32,
                         quantize: Optional[_quant.QuantConfig] = None,
                         input_key: str = "image",
                         platforms: Sequence[str] = ("cpu", "cuda"),
                         metadata: Optional[dict] = None,
                         compute: str = "int8",
                         int8_min_depth: int = 64,
                         overwrite: bool = False) -> str:
  """Writes ``apply`` + ``variables`` as a kdjax-free ``jax.export`` artifact.

  Args:
    apply: the student's apply function (``kdjax.models``); called as
      ``apply(variables, {input_key: x}, train=False).logits``.
    variables: ``{"params": ..., other collections}`` (the student alone).
    directory: output directory (must not exist unless ``overwrite``).
    input_shape: one example's shape (``[H, W, C]``); the batch dimension is
      symbolic, so any batch size runs.
    input_dtype: the input's dtype.
    quantize: store kernels as int8/int4 (+ per-channel scales) and
      fake-quantise activations as in training; ``None``: float32.
    input_key: the batch key the apply function reads.
    platforms: lowering platforms of the artifact.
    metadata: extra JSON-serialisable fields for ``export.json``.
    compute: with activation bits, ``"int8"``: Dense / Conv layers as
      s8 x s8 -> s32 dots / convolutions rescaled by ``s_x[b] s_w[n]``
      (a conv runs directly when it has >= 32 input or output channels,
      else as im2col + dot; see :mod:`kdjax.compress._int8`);
      ``"int8_im2col"`` / ``"int8_direct_conv"``: every conv one way;
      ``"dequantize"``: ``W = q_w s_w`` in float32, then float matmuls on
      fake-quantised activations. Weight-only configs always dequantise.
      ``export.json`` records the compute used and the integer layers.
    int8_min_depth: layers whose contraction depth ``K`` (Dense: input
      features; Conv: window x input channels) is smaller stay
      dequantise-first: XLA:CPU's s8 GEMM (YNNPACK) beats float32 only from
      ``K`` ~ 64 (e.g. a 3x3 conv on a 1-channel image, ``K = 9``, is
      several times slower in int8). ``1``: every covered layer in int8.
    overwrite: replace an existing directory.

  Returns:
    The directory.
  """
  if quantize is not None and not isinstance(quantize, _quant.QuantConfig):
    raise TypeError("quantize must be a QuantConfig or None, got "
                    f"{type(quantize).__name__}.")
  if not isinstance(variables, dict) or "params" not in variables:
    raise TypeError("variables must be {'params': ..., ...}.")
  if os.path.exists(directory):
    if not overwrite:
      raise FileExistsError(f"{directory} exists; pass overwrite=True to "
                            "replace it.")
  if compute not in COMPUTES:
    raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}.")
  variables = jax.device_get(variables)
  stored = dict(variables)
  int_paths, not_int = [], {}
  if quantize is not None:
    stored["params"] = quantize_for_storage(variables["params"],
                                            quantize.weight_bits)
    forward = _quant.quantize_apply(apply, quantize, quantize_weights=False)
    if quantize.act_bits is not None and compute != "dequantize":
      int_paths, not_int = _int8.find_integer_layers(
          apply, variables, stored["params"],
          jax.ShapeDtypeStruct((1, *tuple(input_shape)),
                               jnp.dtype(input_dtype)), input_key,
          min_depth=int8_min_depth)
  else:
    forward = apply
  used = compute if int_paths else ("dequantize" if quantize is not None
                                   else "float")
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(stored)
  # Typed PRNG keys (an NNX model's RNG streams, e.g. for dropout) have no
  # NumPy form: they are stored as their key data and wrapped again inside
  # the exported function.
  key_impls = {i: jax.random.key_impl(x)
               for i, (_, x) in enumerate(leaves_with_paths) if _is_key(x)}
  arrays = [np.asarray(jax.random.key_data(x) if i in key_impls else x)
            for i, (_, x) in enumerate(leaves_with_paths)]
  names = [_leaf_name(p) for p, _ in leaves_with_paths]

  def f(*args):
    *leaves, x = args
    leaves = [jax.random.wrap_key_data(leaf, impl=key_impls[i])
              if i in key_impls else leaf for i, leaf in enumerate(leaves)]
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    if int_paths:
      # Integer layers read (q_w, s_w) from the interceptor; their kernels
      # leave the params tree, so no float copy of them is ever built.
      kernels = {p: (_at(tree["params"], p)["kernel"]["q"],
                     _at(tree["params"], p)["kernel"]["scale"])
                 for p in int_paths}
      tree = {**tree, "params": _without(tree["params"], int_paths)}
      interceptor = _int8.integer_interceptor(
          kernels, quantize.act_bits,
          conv=_CONV[compute])
      from flax import linen as nn  # pylint: disable=g-import-not-at-top
      with nn.intercept_methods(interceptor):
        out = apply(_dequantize_tree(tree), {input_key: x}, train=False)
    else:
      out = forward(_dequantize_tree(tree), {input_key: x}, train=False)
    return jnp.asarray(getattr(out, "logits", out), jnp.float32)

  (batch,) = jax.export.symbolic_shape("b")
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  specs.append(jax.ShapeDtypeStruct((batch, *tuple(input_shape)),
                                    jnp.dtype(input_dtype)))
  exported = jax.export.export(jax.jit(f), platforms=tuple(platforms))(*specs)
  blob = exported.serialize()

  tmp = directory.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  keys = [f"arr_{i:04d}" for i in range(len(arrays))]
  with open(os.path.join(tmp, ARTIFACT), "wb") as fh:
    fh.write(blob)
  np.savez(os.path.join(tmp, PARAMS), **dict(zip(keys, arrays)))
  manifest = {
      "format": FORMAT, "artifact": ARTIFACT, "params": PARAMS,
      "array_keys": keys, "array_names": names,
      "input_shape": [None, *[int(d) for d in input_shape]],
      "input_dtype": jnp.dtype(input_dtype).name,
      "output": "logits float32 [B, num_classes]",
      "quantization": None if quantize is None else quantize.name,
      "compute": used,
      "int8_layers": ["/".join(p) for p in int_paths],
      **({"prng_key_arrays": {names[i]: str(impl) for i, impl in
                              key_impls.items()}} if key_impls else {}),
      "activation_scale": "dynamic, per example" if quantize is not None and (
          quantize.act_bits is not None) else None,
      **({"float_layers": {"/".join(p): why for p, why in not_int.items()}}
         if not_int else {}),
      "platforms": list(exported.platforms),
      "num_params": int(sum(np.size(x) for x in
                            jax.tree.leaves(variables["params"]))),
      "param_bytes": int(sum(a.nbytes for a in arrays)),
      **(metadata or {})}
  with open(os.path.join(tmp, MANIFEST), "w") as fh:
    json.dump(manifest, fh, indent=1)
  with open(os.path.join(tmp, LOADER), "w") as fh:
    fh.write(LOADER_SOURCE)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def directory_size(directory: str) -> int:
  """Total bytes of the files under ``directory``."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, files in os.walk(directory) for name in files)
