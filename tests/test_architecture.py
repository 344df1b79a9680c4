"""The package's shape, as docs/ARCHITECTURE.md states it: rooms imported only from below, one
definition of the languages, one module that knows where checkpoints live, small modules and
functions, no private name used across modules. Read from the source (ast), nothing imported."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rlhf_jax"

# Each room may import the rooms before it (and itself). core/run_folder.py sits after text.
ORDER = ("core", "models", "text", "run_folder", "export", "config", "infer", "data", "eval",
         "train", "rl", "chat", "recipe")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450


def modules():
  return sorted(p for p in PACKAGE.rglob("*.py"))


def room_of(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).parts
  if parts == ("core", "run_folder.py"):
    return "run_folder"
  return parts[0] if len(parts) > 1 else ""


def room_of_module(name: str) -> str:
  parts = name.split(".")
  if parts[:3] == ["rlhf_jax", "core", "run_folder"]:
    return "run_folder"
  return parts[1] if len(parts) > 2 else ""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, module) of every import of our package, however deep in a function."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.append((node.lineno, full if room_of_module(full) else node.module))
    elif isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("rlhf_jax")]
  return out


def test_top_level_holds_only_rooms():
  loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py",
                                                                         "main.py"))
  assert loose == []
  rooms = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
  assert set(rooms) <= set(ORDER), set(rooms) - set(ORDER)


def test_rooms_import_only_from_below():
  problems = []
  for path in modules():
    room = room_of(path)
    if not room:
      continue
    for line, name in imported_modules(ast.parse(path.read_text())):
      other = room_of_module(name)
      if other and ORDER.index(other) > ORDER.index(room):
        problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {room} imports {name}")
  assert not problems, "\n".join(problems)


def test_no_private_name_across_modules():
  problems = []
  for path in modules():
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_jax"):
        problems += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                     if a.name.startswith("_")]
  assert not problems, "\n".join(problems)


def test_languages_and_checkpoints_are_named_once():
  langs = [p for p in modules() if re.search(r"^LANGS\s*=", p.read_text(), re.M)]
  assert [p.relative_to(PACKAGE).as_posix() for p in langs] == ["core/langs.py"]
  named = [p for p in modules() if '"checkpoints"' in p.read_text()]
  assert [p.relative_to(PACKAGE).as_posix() for p in named] == ["core/run_folder.py"]


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_modules_and_functions_are_small(limit):
  long_modules = [f"{p.relative_to(PACKAGE)}: {n}" for p in modules()
                  if (n := len(p.read_text().splitlines())) > limit]
  long_functions = []
  for p in modules():
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long_functions.append(f"{p.relative_to(PACKAGE)}:{node.name}: {n}")
  assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)
