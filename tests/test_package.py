"""The package's shape: no import cycle between bireal_jax's modules, lazy imports included."""
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
  """Modules of bireal_jax that `name` imports anywhere: at module level, under `if` (e.g.
  TYPE_CHECKING) and inside functions alike. A lazy import only postpones a circle: the two
  modules still depend on each other. `from pkg import sub` counts as importing `pkg.sub` when
  that is a module; relative imports are resolved; a submodule importing its own parent package
  is how packages work, not a cycle."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  deps = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - (node.level - 1)] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
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
  # The check sees real edges: the layers use the backend layer, deployment the stage plan, and
  # imports inside functions count (a packed model imports its OpenVINO runner on first use).
  assert "bireal_jax.ops" in graph["bireal_jax.layers"]
  assert "bireal_jax.models.plan" in graph["bireal_jax.deploy.forward"]
  assert "bireal_jax.deploy.openvino" in graph["bireal_jax.deploy.model"]


def test_import_scan_sees_type_checking_and_relative_imports(tmp_path):
  """The scanner itself: an import under `if TYPE_CHECKING:` and a relative one are edges."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "  from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import a\n")
  modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
  assert _imports("pkg.a", pkg / "a.py", modules) == {"pkg.b"}
  assert _imports("pkg.b", pkg / "b.py", modules) == {"pkg.a"}
