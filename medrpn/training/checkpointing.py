"""Checkpoints to resume from: every N optimizer steps, at every epoch end, and when told to stop.

A long run on a shared cluster gets stopped: a job's time runs out (SIGTERM, or SIGUSR1 under
SLURM), a node is pre-empted, a process is killed (SIGKILL). `ResumeCheckpoint` keeps one file,
`last.ckpt`, that is never more than `every_n_train_steps` optimizer steps old, and rewrites it
at once when the process receives SIGTERM (Lightning stops at the next batch boundary and raises
`SIGTERMException`). `medrpn fit --ckpt_path last` then continues from it: the same optimizer
step count, learning-rate schedule and epoch, in the same MLflow run (the checkpoint records the
run, see `checkpoint_run`).

It is a `ModelCheckpoint` that keeps no "top k" files, so it never competes with the checkpoint
of the best validation score, which stays the model logged to MLflow. Its own saves (after a
validation, on SIGTERM) go through Lightning's public `Trainer.save_checkpoint`, so that a minor
Lightning release cannot break resuming by renaming a private method.

`SafeCheckpointIO` makes Lightning read every checkpoint (`--ckpt_path`, and the best one that
`fit` evaluates on the test split) through medrpn's safe reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.errors import MedrpnError


class ResumeCheckpoint(ModelCheckpoint):
    """Writes `<dirpath>/last.ckpt` every `every_n_train_steps` optimizer steps, after every
    validation, and on SIGTERM.

    Args:
        dirpath: folder of `last.ckpt` (the folder `--ckpt_path last` searches); a fixed folder,
            not one named after the run, so that a new command finds it.
        every_n_train_steps: optimizer steps between two saves; 0 saves only at epoch ends and on
            SIGTERM.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 0:
            raise MedrpnError(f"ResumeCheckpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self._saves_by_steps = bool(every_n_train_steps)
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=None if every_n_train_steps else 1,
            enable_version_counter=False,
        )

    @property
    def last_path(self) -> Path:
        """Where `last.ckpt` is written."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After each validation, also when saving by steps (Lightning's own triggers are exclusive)."""
        super().on_validation_end(trainer, pl_module)
        if self._saves_by_steps and not (trainer.sanity_checking or trainer.fast_dev_run):
            self._save_last(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """On SIGTERM, saves the state reached (at a batch boundary, so it resumes exactly)."""
        if not isinstance(exception, SIGTERMException):
            return
        self._save_last(trainer)
        rank_zero_warn(
            f"medrpn: stopped by SIGTERM at optimizer step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"saved {self.last_path}. Resume with: medrpn fit ... --ckpt_path last"
        )

    def _save_last(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.last_path)


def find_last_checkpoint(trainer: Trainer) -> Path | None:
    """The newest `last*.ckpt` in the folders of the trainer's checkpoint callbacks, as
    Lightning's `ckpt_path="last"` resolves it; None if there is none."""
    found = [
        path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
        for path in Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}")
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_run(checkpoint_path: str | Path) -> dict[str, str]:
    """The MLflow run a checkpoint was written by ({"run_id", "experiment_id", "tracking_uri"}; empty
    when it has none), read without running any code from the file."""
    return dict(read_checkpoint(checkpoint_path, mmap=True).get("mlflow_run") or {})


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writing, and reading through `read_checkpoint` (tensors and plain data
    only, errors that name the file) whatever `weights_only` Lightning is asked for: its own reader
    loads a URL, or any file when told `weights_only=False`, with pickle, which can run code."""

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)  # on the CPU: Lightning moves the states where they belong
