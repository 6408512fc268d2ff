"""A workaround for an XLA:CPU data race, applied through ``XLA_FLAGS``.

XLA:CPU in jaxlib 0.10 hands reductions to YNNPACK (``__ynn_fusion``, the
``reduce`` entry of ``--xla_cpu_experimental_ynn_fusion_type``, whose default
is ``individual_dot,individual_convolution,reduce``). YNNPACK splits a
reduction over the intra-op threads; where a broadcast feeds it, tasks can
write each other's partial sums, so the result depends on thread timing:
``jit(lambda a: jnp.sum(jnp.broadcast_to(a, (2, 1024, 1024))))`` of ones
returns 2097152 most calls and e.g. 2098656 or 2129920 in others (7 of 200
calls here, 2 cores). Upstream: openxla/xla#49085, google/XNNPACK#11243,
tensorflow/tensorflow#126812, jax-ml/jax#39741. In training the race shows as
ulp-sized differences between two runs of the same program that then grow,
which breaks exact resumption (BUILD_NOTES.md, "The resume race").

kdjax therefore keeps dots and convolutions on YNNPACK and sends reductions to
XLA's own emitter: :func:`apply` adds
``--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution``
to ``XLA_FLAGS`` when ``kdjax`` is imported. XLA reads the variable when JAX
creates its CPU backend, so it takes effect when ``kdjax`` is imported before
JAX's first computation (the command line always is). It changes nothing when
the user's ``XLA_FLAGS`` already sets that flag, when ``KDJAX_KEEP_XLA_FLAGS=1``
is set, or for a jaxlib outside the versions checked to have both the flag and
the race (an unknown flag in ``XLA_FLAGS`` is a fatal error in XLA).
Standard library only: ``import kdjax`` imports no JAX.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping, Optional

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SAFE_YNN_FUSIONS = "individual_dot,individual_convolution"
OPT_OUT_VARIABLE = "KDJAX_KEEP_XLA_FLAGS"
# jaxlib (major, minor) versions that have the flag and the race.
AFFECTED_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_minor() -> Optional[tuple[int, int]]:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  parts = version.split(".")
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    return None


def flags_with_workaround(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with reductions kept off YNNPACK,
  unless they already choose the YNNPACK fusion types themselves."""
  if YNN_FUSION_FLAG.lstrip("-") in flags:
    return flags
  return f"{flags} {YNN_FUSION_FLAG}={SAFE_YNN_FUSIONS}".strip()


def apply(environ: Optional[MutableMapping[str, str]] = None,
          jaxlib_version: Optional[tuple[int, int]] = None) -> bool:
  """Adds the workaround to ``environ["XLA_FLAGS"]``; True when it did.

  Args:
    environ: the environment to change (default ``os.environ``).
    jaxlib_version: ``(major, minor)`` (default: the installed jaxlib's).
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_VARIABLE) == "1":
    return False
  version = _jaxlib_minor() if jaxlib_version is None else jaxlib_version
  if version not in AFFECTED_JAXLIB:
    return False
  flags = environ.get("XLA_FLAGS", "")
  new = flags_with_workaround(flags)
  environ["XLA_FLAGS"] = new
  return new != flags
