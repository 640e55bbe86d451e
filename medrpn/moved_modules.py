"""Old module names that still import, with a note to update: configs written before the package
was laid out by layer name classes such as `medrpn.tracking_outbox.MLflowLogger`, and scripts
import `medrpn.synth`. Such an import gets the module at its new place and one warning naming it."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "medrpn.lightning_cli": "medrpn.training.cli",
    "medrpn.tracking_outbox": "medrpn.training.tracking_outbox",
    "medrpn.tracking": "medrpn.training.tracking",
    "medrpn.checkpointing": "medrpn.training.checkpointing",
    "medrpn.checkpoint_file": "medrpn.training.checkpoint_file",
    "medrpn.init_weights": "medrpn.training.init_weights",
    "medrpn.weight_averaging": "medrpn.training.weight_averaging",
    "medrpn.distributed": "medrpn.training.distributed",
    "medrpn.runs": "medrpn.training.runs",
    "medrpn.check_data": "medrpn.commands.check_data",
    "medrpn.plan": "medrpn.commands.plan",
    "medrpn.evaluate": "medrpn.commands.evaluate",
    "medrpn.compare": "medrpn.commands.compare",
    "medrpn.second_stage.tool": "medrpn.commands.fit_crops",
    "medrpn.predict": "medrpn.inference.predict",
    "medrpn.scan": "medrpn.inference.scan",
    "medrpn.proposal_settings": "medrpn.inference.proposal_settings",
    "medrpn.synth": "medrpn.data.synth",
    "medrpn.plots": "medrpn.metrics.plots",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):  # the module at its new place, under its old name too
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name of `MOVED` and hands out the new module, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} is now {new}; update the name in your config or code (class_path: {new}.<Class>)",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Adds the finder once (it only answers for the names in `MOVED`)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
