"""The training loop shared by every system: same optimiser, schedule, budget and batches.

AdamW with the recipe's learning rate and weight decay, linear warm-up from lr/100 over the
recipe's warm-up steps, then cosine decay to zero over the budget (as `medrpn fit` does over its
epochs). Under a wall-clock budget the decay follows elapsed time, so every system gets a whole
schedule whatever its speed. A step whose loss is not finite is skipped and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.detectors.data import batch_fingerprint, to_device
from bench.detectors.system import Detector
from medrpn.training.lightning_module import OptimConfig

FINGERPRINT_BATCHES = 3


@dataclass
class Budget:
    """When training stops: after `seconds` of training, after `epochs` epochs, whichever comes first."""

    seconds: float | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.seconds is None and self.epochs is None:
            raise ValueError("a budget needs seconds or epochs")


@dataclass
class TrainStats:
    """What a training run did (times in seconds)."""

    steps: int = 0
    images_seen: int = 0
    epochs_completed: int = 0
    seconds: float = 0.0
    nonfinite_steps: int = 0
    boxes_dropped: int = 0
    first_losses: list[float] = field(default_factory=list)
    last_losses: list[float] = field(default_factory=list)
    fingerprint: str = ""
    step_ends: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, images so far)

    def images_per_second(self, after: float = 0.0) -> float | None:
        """Training throughput, over the whole run or only after `after` seconds (None when under 5 steps remain)."""
        if after <= 0:
            return self.images_seen / self.seconds if self.seconds > 0 else None
        start = next(((t, n) for t, n in self.step_ends if t >= after), None)
        if start is None or len(self.step_ends) - self.step_ends.index(start) < 5:
            return None
        t_end, n_end = self.step_ends[-1]
        return (n_end - start[1]) / (t_end - start[0]) if t_end > start[0] else None

    def summary(self, train_size: int, warmup_seconds: float) -> dict[str, Any]:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "steps": self.steps,
            "images_seen": self.images_seen,
            "epochs_completed": self.epochs_completed,
            "epochs": round(self.images_seen / train_size, 3) if train_size else None,
            "train_seconds": round(self.seconds, 2),
            "train_images_per_s": _round(self.images_per_second()),
            "train_images_per_s_after_warmup": _round(self.images_per_second(warmup_seconds)),
            "warmup_seconds": warmup_seconds,
            "loss_first_steps": _round(mean(self.first_losses)),
            "loss_last_steps": _round(mean(self.last_losses)),
            "nonfinite_steps": self.nonfinite_steps,
            "boxes_dropped": self.boxes_dropped,
            "batch_fingerprint": self.fingerprint,
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    warm = 0.01 + 0.99 * step / warmup_steps if step < warmup_steps else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    detector: Detector,
    train_loader: DataLoader,
    device: torch.device,
    optim: OptimConfig,
    budget: Budget,
    log: Callable[[str], None] = print,
    log_every_seconds: float = 30.0,
) -> TrainStats:
    """Trains `detector.model` in place within `budget`; returns what happened."""
    model = detector.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    steps_per_epoch = max(len(train_loader), 1)
    total_steps = budget.epochs * steps_per_epoch if budget.epochs is not None else None
    warmup = min(optim.warmup_steps, total_steps // 2) if total_steps is not None else optim.warmup_steps
    stats = TrainStats()
    recent: list[float] = []
    fingerprinted: list[dict[str, Any]] = []
    _sync(device)
    start = last_log = time.perf_counter()
    done = False
    while not done:
        for batch in train_loader:
            if len(batch["images"]) == 0:
                continue
            if len(fingerprinted) < FINGERPRINT_BATCHES:
                fingerprinted.append(batch)
                if len(fingerprinted) == FINGERPRINT_BATCHES:
                    stats.fingerprint = batch_fingerprint(fingerprinted)
            elapsed = time.perf_counter() - start
            progress = max(
                elapsed / budget.seconds if budget.seconds else 0.0,
                stats.steps / total_steps if total_steps else 0.0,
            )
            for group in optimizer.param_groups:
                group["lr"] = optim.lr * _lr_factor(stats.steps, progress, max(warmup, 1))
            images, targets, dropped = to_device(batch, device)
            stats.boxes_dropped += dropped
            losses = detector.losses(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if len(stats.first_losses) < 10:
                    stats.first_losses.append(value)
                recent = (recent + [value])[-10:]
            else:
                stats.nonfinite_steps += 1
            _sync(device)
            now = time.perf_counter() - start
            stats.steps += 1
            stats.images_seen += len(images)
            stats.step_ends.append((now, stats.images_seen))
            if time.perf_counter() - last_log >= log_every_seconds:
                last_log = time.perf_counter()
                log(f"  {now:7.1f} s  step {stats.steps:5d}  epoch {stats.images_seen / max(len(train_loader.dataset), 1):6.2f}  "
                    f"loss {sum(recent) / max(len(recent), 1):.3f}  {stats.images_seen / now:.2f} img/s")
            if budget.seconds is not None and now >= budget.seconds:
                done = True
                break
        else:
            stats.epochs_completed += 1
            if budget.epochs is not None and stats.epochs_completed >= budget.epochs:
                done = True
        if stats.steps == 0:  # an empty loader: nothing will ever train
            break
    stats.seconds = time.perf_counter() - start
    stats.last_losses = recent
    if not stats.fingerprint and fingerprinted:
        stats.fingerprint = batch_fingerprint(fingerprinted)
    return stats
