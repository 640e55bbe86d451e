"""An exponential moving average (EMA) of the weights, validated and kept in place of the raw ones.

Validation recall of the brain RPN moved by 1-2% (4-6 tumours of 355) between neighbouring
epochs of one run (docs/rpn_ablation.md): the last steps' weights are a noisy sample around where
training is heading. An average over the last few hundred optimiser steps is a steadier model
(YOLO, DETR-style detectors and nnDetection's SWA use one for that reason).

Lightning's `EMAWeightAveraging` does the work: it updates the average after every optimiser
step, validates the averaged weights, and saves them as a checkpoint's `state_dict` (the raw
weights go under `current_model_state`, so `fit --ckpt_path last` resumes both). So `best.ckpt`,
`predict`, `evaluate` and `model.init_weights` all read the averaged weights, which are the ones
validation chose.

`ModelEMA` mends one thing: Lightning's callback, still holding its average after `fit`, answers
the checkpoint load of `trainer.test(ckpt_path=best)` (the held-out evaluation that ends `medrpn
fit`) by putting the raw weights back into the model, so the test split would be scored with
weights that validation never saw. Here only a resumed fit restores the raw weights.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from medrpn.errors import ConfigError


class ModelEMA(EMAWeightAveraging):
    """EMA of the model's parameters and buffers, updated after every optimiser step.

    Args:
        decay: weight of the average at each update (0.998: an average over about the last
            1 / (1 - decay) = 500 optimiser steps). The first update copies the weights, so the
            average never holds the untrained initialisation.
    """

    def __init__(self, decay: float = 0.998) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"ModelEMA.decay must be in (0, 1), got {decay}")
        super().__init__(decay=decay)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A resumed fit restores the average and the raw weights; any other load (validate, test,
        predict) keeps the checkpoint's `state_dict`, the averaged weights."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
