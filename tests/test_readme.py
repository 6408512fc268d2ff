"""The README's Python snippets run as written.

Every fenced ```python block of README.md (also one indented inside a list
item) must be complete: its own imports, data and models, tiny shapes. Two
checks per block:

* ``test_block_defines_its_names`` (fast): every name the block reads is
  bound in the block itself (assignment, import, def, argument, ...) or is a
  builtin;
* ``test_block_runs`` (slow): the block runs in a fresh Python (its own
  process and namespace), in a temporary working directory, with 8 simulated
  CPU devices (so the sharding snippet splits for real), and logs no warning
  (e.g. orbax's "did not provide metrics" for a ``best_metric`` checkpointer
  saved without metrics).

A block added later to the README is picked up automatically.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>```+|~~~+)\s*(?P<lang>[\w+-]*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(first line, code)`` of every ```python block, dedented by its fence."""
  blocks = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, ticks, lang = m.group("indent"), m.group("ticks"), m.group("lang")
    start = i + 1
    j = start
    while j < len(lines) and not lines[j].strip().startswith(ticks):
      j += 1
    if lang.lower() in ("python", "py", "python3"):
      body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip()
              for ln in lines[start:j]]
      blocks.append((start + 1, "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def _read_blocks() -> list[tuple[int, str]]:
  with open(README, encoding="utf-8") as f:
    return python_blocks(f.read())


BLOCKS = _read_blocks()
IDS = [f"README.md:{line}" for line, _ in BLOCKS]


class _Names(ast.NodeVisitor):
  """Names read and names bound anywhere in a module (scope-insensitive)."""

  def __init__(self):
    self.loaded: dict[str, int] = {}
    self.bound: set[str] = set()

  def visit_Name(self, node):  # pylint: disable=invalid-name
    if isinstance(node.ctx, ast.Load):
      self.loaded.setdefault(node.id, node.lineno)
    else:
      self.bound.add(node.id)

  def visit_Import(self, node):  # pylint: disable=invalid-name
    for alias in node.names:
      self.bound.add((alias.asname or alias.name).split(".")[0])

  visit_ImportFrom = visit_Import  # pylint: disable=invalid-name

  def _def(self, node):
    self.bound.add(node.name)
    self.generic_visit(node)

  # pylint: disable-next=invalid-name
  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

  def visit_arg(self, node):  # pylint: disable=invalid-name
    self.bound.add(node.arg)

  def visit_ExceptHandler(self, node):  # pylint: disable=invalid-name
    if node.name:
      self.bound.add(node.name)
    self.generic_visit(node)


_WARNING = re.compile(r"^(WARNING[:\s]|\S*Warning: )|\s\w*Warning: ", re.M)


def undefined_names(code: str) -> dict[str, int]:
  """``{name: line}`` of names the code reads but never binds (nor builtins)."""
  visitor = _Names()
  visitor.visit(ast.parse(code))
  known = visitor.bound | set(dir(builtins)) | {"__file__", "__name__"}
  return {n: ln for n, ln in visitor.loaded.items() if n not in known}


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 5, "expected the README's Python examples"
  # The extractor sees indented blocks (inside list items) too.
  nested = python_blocks("- item\n  ```python\n  x = 1\n  print(x)\n  ```\n")
  assert nested == [(3, "x = 1\nprint(x)\n")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=IDS)
def test_block_defines_its_names(line, code):
  missing = undefined_names(code)
  assert not missing, (
      f"the README's python block at line {line} uses names it does not "
      "define: " + ", ".join(f"{n} (block line {ln})"
                             for n, ln in sorted(missing.items())))


@pytest.mark.slow
@pytest.mark.parametrize("line,code", BLOCKS, ids=IDS)
def test_block_runs(line, code, tmp_path):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      + env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  script = tmp_path / "snippet.py"
  script.write_text(code)
  proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                        text=True, timeout=600, env=env, cwd=tmp_path)
  assert proc.returncode == 0, (
      f"the README's python block at line {line} failed (exit "
      f"{proc.returncode}):\n{code}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
      f"STDERR:\n{proc.stderr[-6000:]}")
  warnings = [ln for ln in proc.stderr.splitlines() if _WARNING.search(ln)]
  assert not warnings, (
      f"the README's python block at line {line} runs but warns; an example "
      "should run cleanly:\n" + "\n".join(warnings[:10]))
