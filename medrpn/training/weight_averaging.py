"""An exponential moving average (EMA) of the weights, validated and kept in place of the raw ones.

Validation recall of the brain RPN moved by 1-2% (4-6 tumours of 355) between neighbouring
epochs of one run (docs/rpn_ablation.md): the last steps' weights are a noisy sample around where
training is heading. An average over the last few hundred optimiser steps is a steadier model
(YOLO, DETR-style detectors and nnDetection's SWA use one for that reason).

Measured on the brain 384 px fine-tune (docs/rpn_ablation.md): validation recall@100 of the
average stayed within 0.975-0.980 from the first epoch on, where the raw weights of an earlier
run moved over 0.958-0.986; at the end of the cosine schedule, where the weights barely move, the
average and the raw weights scored the same CPM, so no recipe turns it on.

Lightning's `WeightAveraging` does the work: it updates the average after every optimiser step,
validates the averaged weights, and saves them as a checkpoint's `state_dict` (the raw weights go
under `current_model_state`, so `fit --ckpt_path last` resumes both). So `best.ckpt`, `predict`,
`evaluate` and `model.init_weights` all read the averaged weights, which are the ones validation
chose.

`ModelEMA` adds two things to Lightning's `EMAWeightAveraging`:
- The decay ramps up with the number of updates n, as min(decay, (1 + n) / (10 + n))
  (TensorFlow's `ExponentialMovingAverage` with `num_updates`; YOLOv5 ramps likewise): with a
  fixed 0.998 the first epoch's validation of a fine-tuning run still weighed its starting point
  (with freshly initialised head layers) at 0.998^218 = 0.65, and scored val recall@100 0.856.
- Lightning's callback, still holding its average after `fit`, answers the checkpoint load of
  `trainer.test(ckpt_path=best)` (the held-out evaluation that ends `medrpn fit`) by putting the
  raw weights back into the model, so the test split would be scored with weights that
  validation never saw. Here only a resumed fit restores the raw weights.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from medrpn.errors import ConfigError


class ModelEMA(WeightAveraging):
    """EMA of the model's parameters and buffers, updated after every optimiser step.

    Args:
        decay: the largest weight of the average at an update (0.998: in the end an average over
            about the last 1 / (1 - decay) = 500 optimiser steps); earlier, `ramped_decay`.
    """

    def __init__(self, decay: float = 0.998) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"ModelEMA.decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        super().__init__(multi_avg_fn=self._update)

    def _update(self, averages: list[torch.Tensor], currents: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        """One update of a group of tensors (one device and dtype) in place, by torch's EMA with
        this update's decay (read once per group, not once per tensor: no sync per tensor on a GPU)."""
        get_ema_multi_avg_fn(ramped_decay(self.decay, int(num_averaged)))(averages, currents, num_averaged)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A resumed fit restores the average and the raw weights; any other load (validate, test,
        predict) keeps the checkpoint's `state_dict`, the averaged weights."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def ramped_decay(decay: float, num_averaged: int) -> float:
    """The decay of the update after `num_averaged` earlier ones: min(decay, (1 + n) / (10 + n)),
    so the average soon forgets where training started (0.18 at the second update, 0.92 at the
    101st) and becomes a steady average over the last 1 / (1 - decay) steps (n >= 4,491 for 0.998)."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))
