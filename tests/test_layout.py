"""The package's layout: every module imports on its own (no import cycle hides behind an import
order), the layers import only the layers below them, and old module names still import."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import warnings
from pathlib import Path

import pytest

import medrpn
from medrpn.moved_modules import MOVED

PACKAGE = Path(medrpn.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="medrpn.") if m.name != "medrpn.__main__")
# layer -> the medrpn layers its modules may import (besides medrpn.errors and medrpn itself)
ALLOWED = {
    "data": {"data"},
    "model": {"model"},
    "metrics": {"metrics"},
    "outputs": {"outputs", "data"},
    "second_stage": {"second_stage", "model", "data", "metrics"},
    "node": {"node", "inference"},
    "review": {"review", "outputs"},
}
# modules a layer may import beyond those: the one safe checkpoint reader is plain torch
READER = "medrpn.training.checkpoint_file"


def _medrpn_imports(path: Path) -> set[str]:
    """The medrpn modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medrpn"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medrpn")}
    return found


def test_every_module_imports_on_its_own():
    """Each module is imported first among medrpn's, in a clean slate of medrpn modules: a cycle
    that a lucky import order hides elsewhere fails here."""
    assert len(MODULES) > 60 and "medrpn.training.lightning_module" in MODULES
    failures = {}
    kept = {k: v for k, v in sys.modules.items() if k == "medrpn" or k.startswith("medrpn.")}
    try:
        for name in MODULES:
            for loaded in [k for k in sys.modules if k.startswith("medrpn.") and k != "medrpn.moved_modules"]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - collected, reported together
                failures[name] = f"{type(error).__name__}: {error}"
    finally:
        sys.modules.update(kept)
    assert not failures, failures


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = {}
    for path in (PACKAGE / layer).rglob("*.py"):
        for module in _medrpn_imports(path):
            parts = module.split(".")
            if module in ("medrpn", "medrpn.errors") or len(parts) < 2:
                continue
            if parts[1] not in ALLOWED[layer] and module != READER:
                wrong.setdefault(str(path.relative_to(PACKAGE)), []).append(module)
    assert not wrong, wrong


# Lightning's own classes outside the training system: the LightningDataModule, and the crop
# classifier's small LightningModule
LIGHTNING_ELSEWHERE = ("data/datamodule.py", "second_stage/training.py")


def test_lightning_and_mlflow_stay_in_the_training_system():
    wrong = {}
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE)
        if where.parts[0] in ("training", "commands", "inference") or where.as_posix() in LIGHTNING_ELSEWHERE:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
            if any(n.split(".")[0] in ("lightning", "mlflow") for n in names):
                wrong.setdefault(str(path.relative_to(PACKAGE)), []).extend(names)
    assert not wrong, wrong


@pytest.mark.parametrize("old", ["medrpn.tracking_outbox", "medrpn.checkpointing", "medrpn.synth"])
def test_an_old_module_name_imports_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert any(MOVED[old] in str(w.message) and issubclass(w.category, FutureWarning) for w in caught)


def test_a_config_naming_classes_at_their_old_place_still_parses(tmp_path, capsys):
    """A config written before the layout (`medrpn.tracking_outbox.MLflowLogger`, ...) trains as
    before: fit parses it, with the classes at their new place."""
    from medrpn.cli import main as medrpn_main

    repo = PACKAGE.parent
    text = (repo / "configs" / "demo.yaml").read_text()
    old = text.replace("medrpn.training.tracking_outbox.", "medrpn.tracking_outbox.").replace(
        "medrpn.training.checkpointing.", "medrpn.checkpointing."
    )
    assert "medrpn.tracking_outbox.MLflowLogger" in old and "medrpn.checkpointing.ResumeCheckpoint" in old
    config = tmp_path / "old.yaml"
    config.write_text(old)
    for name in ("medrpn.tracking_outbox", "medrpn.checkpointing"):
        sys.modules.pop(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(SystemExit) as done:
            medrpn_main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    assert "MLflowLogger" in printed and "ResumeCheckpoint" in printed
