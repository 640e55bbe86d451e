"""The training system: what turns the plain-PyTorch model (`medrpn.model`) and data
(`medrpn.data`) into `medrpn fit`, built on Lightning and MLflow.

- `lightning_module`: `LesionDetectionModule`, the thin LightningModule around the detector
  (losses, optimiser, validation metrics), and `OptimConfig`.
- `cli`: the LightningCLI wiring of fit / validate / test (checkpoint settings, anchors planned
  at the start, resume, one-line errors).
- `tracking`, `tracking_outbox`, `runs`: MLflow (the config and dataset fingerprint of a run, the
  logger with its outbox for a server that goes away, evaluation reports and clients).
- `checkpointing`, `checkpoint_file`, `init_weights`, `weight_averaging`: the callbacks and the
  one safe checkpoint reader.
- `distributed`: what keeps a DDP run from hanging when one process dies.

MLflow is imported only here and by the commands; Lightning also by the LightningDataModule
(`medrpn.data.datamodule`) and the crop classifier's training (`medrpn.second_stage.training`).
"""

from __future__ import annotations

from typing import Any

_LIGHTNING_MODULE_NAMES = ("AUTO", "LOSS_NAMES", "RPN_LOSS_NAMES", "LesionDetectionModule", "OptimConfig", "checkpoint_model_settings")


def __getattr__(name: str) -> Any:
    """`medrpn.training.LesionDetectionModule` and the other names of the former `medrpn/training.py`
    (class paths in older configs and code), without importing Lightning for every submodule."""
    if name in _LIGHTNING_MODULE_NAMES:
        from medrpn.training import lightning_module

        return getattr(lightning_module, name)
    raise AttributeError(f"module 'medrpn.training' has no attribute {name!r}")
