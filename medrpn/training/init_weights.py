"""Starting a training run from another run's weights (fine-tuning), which is not resuming it.

`model.init_weights: PATH` (a checkpoint written by `medrpn fit`) has `fit` start from every
tensor of that checkpoint whose name and shape match the new model's; the optimiser, learning-rate
schedule, epoch count and MLflow run are new. Tensors that do not match (another number of
classes, another count of anchors per position) keep their fresh initialisation and are listed,
so nothing is dropped unseen. A resumed fit (`--ckpt_path`) restores its own weights instead.

Uses: progressive resizing (train at a small input, then fine-tune at a larger one: anchor sizes
may change, since the RPN predicts offsets relative to its anchors), or a model trained on one
data set as the start for another (MMDetection's ``load_from``, Detectron2's ``MODEL.WEIGHTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.errors import MedrpnError

KIND = "checkpoint to start from (model.init_weights)"


@dataclass
class InitReport:
    """What `load_matching_weights` did.

    Attributes:
        path: the checkpoint read.
        loaded: names of the tensors taken from it.
        kept: ``(name, why)`` of this model's tensors left as built.
        unused: names of the file's tensors this model has no place for.
    """

    path: Path
    loaded: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line, plus one line per tensor left as built or unused."""
        lines = [
            f"medrpn: started from {self.path}: {len(self.loaded)} tensors loaded, {len(self.kept)} left as built, "
            f"{len(self.unused)} in the file unused"
        ]
        lines += [f"  left as built: {name} ({why})" for name, why in self.kept]
        lines += [f"  unused: {name}" for name in self.unused]
        return "\n".join(lines)


def load_matching_weights(module: nn.Module, path: str | Path) -> InitReport:
    """Copies into `module` every tensor of the checkpoint at `path` that matches by name and shape.

    Raises:
        MedrpnError: naming the file: missing, unreadable, without a ``state_dict``, or with no
            tensor that fits `module` (a checkpoint of another kind of model).
    """
    path = Path(path)
    state = read_checkpoint(path, kind=KIND).get("state_dict")
    if not isinstance(state, dict):
        raise MedrpnError(f"{path}: the {KIND} has no state_dict: it was not written by `medrpn fit`")
    own = module.state_dict()
    fitting = {name: value for name, value in state.items() if name in own and value.shape == own[name].shape}
    if not fitting:
        raise MedrpnError(
            f"{path}: none of the {len(state)} tensors of the {KIND} fits this model (their names or shapes "
            "differ): it holds another kind of model"
        )
    module.load_state_dict(fitting, strict=False)
    kept = [
        (name, "not in the file" if name not in state else f"shape {list(state[name].shape)} in the file, {list(value.shape)} here")
        for name, value in own.items()
        if name not in fitting
    ]
    return InitReport(path=path, loaded=sorted(fitting), kept=kept, unused=sorted(set(state) - set(own)))
