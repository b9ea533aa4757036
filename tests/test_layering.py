"""The package's layers import one way: tools -> engine -> method -> models, data -> shared.

Every import of every module under ``src/bida`` is read from its syntax tree (those inside
functions too), resolved to a module of the package (relative imports and absolute ones), and checked against :data:`MAY_IMPORT`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bida

PACKAGE = Path(bida.__file__).parent

# The layer of each part, and the layers each may import. "shared" is config (a package: its
# modules too), errors, checkpoint and labels (and the package root itself); the public method
# modules at the top (bida.losses, ...) belong to the method, whose functions they expose.
MAY_IMPORT = {
    "shared": {"shared"},
    "models": {"shared", "models"},
    "data": {"shared", "data"},
    "method": {"shared", "models", "data", "method"},
    "engine": {"shared", "models", "data", "method", "engine"},
    "tools": {"shared", "models", "data", "method", "engine", "tools"},
}
TOP_LEVEL = {"config": "shared", "errors": "shared", "checkpoint": "shared", "__init__": "shared",
             "labels": "shared", "losses": "method", "prototypes": "method", "pseudo_labels": "method",
             "__main__": "tools"}


def layer_of(module: str) -> str | None:
    """Layer of ``bida.<...>`` (None for modules outside the package)."""
    parts = module.split(".")
    if parts[0] != "bida":
        return None
    if len(parts) == 1:
        return "shared"
    head = parts[1]
    if head in MAY_IMPORT:
        return head
    return TOP_LEVEL.get(head, "shared")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file at ``path`` of the package at ``root``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # ``from . import x``: x may be a submodule.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if (root.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                      or (root.parent / f"{target}.{alias.name}".replace(".", "/") / "__init__.py").exists()]
    return found


def layer_violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that goes against :data:`MAY_IMPORT`, as 'file:line: a -> b'."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = layer_of(module_name(path, root))
        if path.parent == root:
            source = TOP_LEVEL.get(path.stem, "shared")
        for line, target in imported_modules(path, root):
            dest = layer_of(target)
            if dest is not None and dest not in MAY_IMPORT[source]:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {source} imports {dest} ({target})")
    return problems


def test_the_package_imports_one_way():
    assert layer_violations(PACKAGE) == []
    # The check sees real imports: the engine reaches the method, tools reach the engine.
    engine = {t for _, t in imported_modules(PACKAGE / "engine" / "schedules.py", PACKAGE)}
    assert "bida.method.train_step" in engine and "bida.config" in engine
    assert "bida.engine.train" in {t for _, t in imported_modules(PACKAGE / "tools" / "grid.py", PACKAGE)}
    # The config package and each of its modules are shared, and they import within it.
    assert (PACKAGE / "config" / "__init__.py").is_file()
    assert {layer_of(f"bida.config.{p.stem}") for p in (PACKAGE / "config").glob("*.py")} == {"shared"}
    assert "bida.config.schema" in {t for _, t in imported_modules(PACKAGE / "config" / "loading.py", PACKAGE)}


def test_the_check_finds_planted_violations(tmp_path):
    root = tmp_path / "bida"
    for sub in ("", "engine", "method", "models", "data", "tools"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "__init__.py").write_text("")
    (root / "config.py").write_text("from .errors import X\n")
    (root / "engine" / "train.py").write_text("from ..method import steps\nfrom . import checkpoint\n")
    (root / "engine" / "checkpoint.py").write_text("")
    (root / "method" / "steps.py").write_text("from ..models import net\n")
    (root / "tools" / "cli.py").write_text("from ..engine.train import run\n")
    assert layer_violations(root) == []

    (root / "method" / "steps.py").write_text("import torch\n\ndef f():\n    from ..engine import train\n")
    (root / "data" / "reader.py").write_text("import bida.tools.cli\n")  # an absolute import of a tool
    (root / "engine" / "train.py").write_text("from ..tools.cli import main\n")
    (root / "models" / "net.py").write_text("from .. import data\n")
    (root / "config.py").write_text("from .engine import checkpoint\n")
    assert layer_violations(root) == [
        "bida/config.py:1: shared imports engine (bida.engine)",
        "bida/config.py:1: shared imports engine (bida.engine.checkpoint)",
        "bida/data/reader.py:1: data imports tools (bida.tools.cli)",
        "bida/engine/train.py:1: engine imports tools (bida.tools.cli)",
        "bida/method/steps.py:4: method imports engine (bida.engine)",
        "bida/method/steps.py:4: method imports engine (bida.engine.train)",
        "bida/models/net.py:1: models imports data (bida.data)",
    ]


def test_the_check_reads_the_config_package(tmp_path):
    # config is a package: its modules are shared too, and may import each other and the shared modules only.
    root = tmp_path / "bida"
    for sub in ("", "config", "engine", "method"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "__init__.py").write_text("")
    (root / "config" / "__init__.py").write_text("from .loading import load_config\n")
    (root / "config" / "schema.py").write_text("from ..errors import ConfigError\n")
    (root / "config" / "loading.py").write_text("from .schema import Config\nfrom ..checkpoint import atomic_write_text\n")
    assert layer_violations(root) == []

    (root / "config" / "loading.py").write_text("from ..engine import checkpoint\n")
    (root / "config" / "checks.py").write_text("def f():\n    from ..method.steps import x\n")
    assert layer_violations(root) == [
        "bida/config/checks.py:2: shared imports method (bida.method.steps)",
        "bida/config/loading.py:1: shared imports engine (bida.engine)",
    ]


def trainer_reaches(path: Path, root: Path) -> list[str]:
    """Where a module takes the trainer: a parameter named ``trainer`` (of a function, method or
    lambda) or an import of :mod:`bida.engine.train`, as 'file:line: what'."""
    found = []
    rel = path.relative_to(root.parent)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None and arg.arg == "trainer":
                    found.append(f"{rel}:{node.lineno}: parameter 'trainer'")
    found += [f"{rel}:{line}: imports {target}" for line, target in imported_modules(path, root)
              if target == "bida.engine.train" or target.startswith("bida.engine.train.")]
    return sorted(found, key=lambda hit: int(hit.split(":")[1]))


def engine_trainer_reaches(root: Path) -> list[str]:
    """:func:`trainer_reaches` over the engine's modules but the loop's own (engine/train.py)."""
    return [hit for path in sorted((root / "engine").glob("*.py")) if path.name != "train.py"
            for hit in trainer_reaches(path, root)]


def test_no_engine_part_takes_the_trainer():
    # Each part (checkpointer, evaluator, round labels, run log, stop control, schedules) is
    # built from what it uses: only the loop holds the trainer.
    assert engine_trainer_reaches(PACKAGE) == []


def test_the_trainer_check_finds_planted_reaches(tmp_path):
    root = tmp_path / "bida"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "__init__.py").write_text("")
    (root / "engine" / "train.py").write_text("def fit(trainer):\n    pass\n")  # the loop's own: allowed
    (root / "engine" / "evaluator.py").write_text("def evaluate(model, *, steps=1):\n    pass\n")
    assert engine_trainer_reaches(root) == []
    (root / "engine" / "evaluator.py").write_text(
        "class E:\n    def run(self, trainer):\n        pass\n"
        "def g(*, trainer=None):\n    pass\n"
        "def h():\n    from .train import Trainer\n")
    (root / "engine" / "stop.py").write_text("import bida.engine.train\nf = lambda trainer: trainer\n")
    assert engine_trainer_reaches(root) == [
        "bida/engine/evaluator.py:2: parameter 'trainer'",
        "bida/engine/evaluator.py:4: parameter 'trainer'",
        "bida/engine/evaluator.py:7: imports bida.engine.train",
        "bida/engine/stop.py:1: imports bida.engine.train",
        "bida/engine/stop.py:2: parameter 'trainer'",
    ]
