"""The package's shape: no import cycle between bireal_jax's modules."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bireal_jax"


def _modules() -> dict:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


def _imports(name: str, path: Path, modules: dict) -> set:
  """Modules of bireal_jax that `name` imports at module level (not under `if`, e.g.
  TYPE_CHECKING, and not inside functions: lazy imports cannot form a cycle at import time).
  `from pkg import sub` counts as importing `pkg.sub` when that is a module; a submodule
  importing its own parent package is how packages work, not a cycle."""
  deps = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                 else node.module for a in node.names]
    else:
      continue
    deps |= {t for t in targets
             if t in modules and t != name and not name.startswith(t + ".")}
  return deps


def test_no_import_cycle_in_bireal_jax():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  assert "bireal_jax.deploy.format" in graph and "bireal_jax.train.loop" in graph
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d, stack)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  assert cycles == []
  # The check sees real edges: the layers use the backend layer, deployment the stage plan.
  assert "bireal_jax.ops" in graph["bireal_jax.layers"]
  assert "bireal_jax.models.plan" in graph["bireal_jax.deploy.forward"]
