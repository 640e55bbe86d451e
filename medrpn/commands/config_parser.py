"""The training config read as `medrpn fit` reads it, by the commands that only read it.

`check-data`, `plan`, `evaluate` and `fit-crops` take what `medrpn fit` takes: one or more
`--config` files, dotted overrides (`--data.annotations Y`, `--model.anchors auto`), defaults
filled from the classes for what the files leave out, and `--print_config`. So a command line
that trains on some data also checks, plans and evaluates on exactly that data. They parse with
the parser LightningCLI builds for fit (the Trainer's, the LightningModule's and the
LightningDataModule's arguments, with medrpn's links and defaults from
`medrpn.training.cli.configure_parser`) and instantiate nothing: each command builds what it
needs from the settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile
from jsonargparse import Namespace as ConfigNamespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import ConfigError
from medrpn.training.cli import configure_parser
from medrpn.model.anchor_planning import AnchorSetup
from medrpn.model.anchors import AnchorConfig
from medrpn.training.lightning_module import LesionDetectionModule

TRAINING_SECTIONS = ("seed_everything", "trainer", "model", "data")
CONFIG_HELP = "a training config, as `medrpn fit --config` takes it (several may follow one another)"


def training_config_parser(prog: str, description: str) -> LightningArgumentParser:
    """A parser of `medrpn fit`'s settings (`--config`, `--model.*`, `--data.*`, `--trainer.*`,
    `--seed_everything`) to which a command adds its own arguments.

    Args:
        prog, description: the command's name and what it does, for `--help`.
    """
    parser = LightningArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help=CONFIG_HELP)
    parser.add_argument("--seed_everything", type=bool | int, default=True, help="as for medrpn fit (not used here)")
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LesionDetectionModule, "model")
    parser.add_lightning_class_args(LesionDataModule, "data")
    configure_parser(parser)
    return parser


def set_defaults_from(parser: LightningArgumentParser, section: str, values: Mapping[str, Any]) -> None:
    """Make `values` (e.g. a checkpoint's stored data settings) the defaults of `section`'s arguments,
    so that what a config or the command line does not give comes from them; unknown keys are left out."""
    known = parser.get_defaults()[section]
    parser.set_defaults({f"{section}.{key}": value for key, value in values.items() if key in known})


def parse_training_config(parser: LightningArgumentParser, argv: Sequence[str]) -> tuple[ConfigNamespace, dict[str, Any]]:
    """The parsed command line (the command's own arguments and the training config, a namespace)
    and the training config as plain nested dicts (`data`, `model`, `trainer`, `seed_everything`),
    parsed and checked like `medrpn fit`'s."""
    args = parser.parse_args(list(argv))
    config = {key: args[key].as_dict() if key != "seed_everything" else args[key] for key in TRAINING_SECTIONS}
    return args, config


def config_source(args: ConfigNamespace) -> str:
    """The config files a command was given, for its messages ("the command line" when none)."""
    files = [str(path) for path in (args.get("config") or []) if path is not None]
    return ", ".join(files) or "the command line"


def config_sections(config: Any, source: Path | str) -> tuple[dict[str, Any], AnchorSetup]:
    """The `data` arguments and the anchor settings of a parsed training config (`source` names it in errors)."""
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise ConfigError(f"{source}: no 'data' section")
    data = dict(config["data"])
    data = data.get("init_args", data) if "class_path" in data else data
    model = config.get("model") or {}
    model = model.get("init_args", model) if "class_path" in model else model
    anchors = model.get("anchors")
    anchors = AnchorConfig() if anchors == "auto" else AnchorConfig(**(anchors or {}))  # auto: planned by the caller
    stages = (model.get("backbone") or {}).get("returned_stages") or [1, 2, 3, 4]
    return data, AnchorSetup(anchors, list(stages))


def read_yaml(path: Path) -> Any:
    """The YAML of a config file as it is written (no defaults, no checks), for tools that edit and
    write configs; a clear `ConfigError` when it is missing or not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
