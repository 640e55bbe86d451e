"""Every command reads the training config as `medrpn fit` does: the same files, overrides and
defaults reach the same data module (check-data, plan, evaluate, fit-crops: `medrpn.commands.config_parser`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medrpn.cli import main as medrpn_main
from medrpn.commands.config_parser import parse_training_config, training_config_parser
from medrpn.data.synth import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def _fit_print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        medrpn_main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", ["demo.yaml", "brain_tumor_mri.yaml"])
def test_the_commands_parse_a_command_line_as_fit_does(config, capsys, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  image_size: 96\n  read:\n    max_decoded_bytes: 12345\n")
    args = ["--config", str(REPO / "configs" / config), "--config", str(other),
            "--data.annotations", "elsewhere.csv", "--model.froc_iou_threshold", "0.5"]
    fit = _fit_print_config(args, capsys)
    _, ours = parse_training_config(training_config_parser("t", "t"), args)
    assert ours["data"] == fit["data"]
    assert ours["data"]["annotations"] == "elsewhere.csv" and ours["data"]["image_size"] == 96
    assert ours["data"]["read"]["max_decoded_bytes"] == 12345
    assert {k: ours["model"][k] for k in fit["model"]} == fit["model"]


def test_check_data_checks_the_data_an_override_names(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "a", n_images=12, image_size=64, seed=1)
    write_synthetic_dataset(tmp_path / "b", n_images=20, image_size=64, seed=2)
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  annotations: {tmp_path / 'a' / 'annotations.csv'}\n  image_size: 64\n  num_workers: 0\n")
    for folder, n in (("a", 12), ("b", 20)):
        args = ["check-data", "--config", str(config)]
        if folder == "b":
            args += ["--data.annotations", str(tmp_path / "b" / "annotations.csv")]
        try:
            medrpn_main(args)
        except SystemExit as done:
            assert done.code in (0, 1)
        out = capsys.readouterr().out
        assert f"annotations   {tmp_path / folder / 'annotations.csv'}" in out
        assert f"images        found {n}, readable {n}" in out


def test_a_config_in_utf8_reads_the_same_where_the_locale_is_ascii(tmp_path):
    """medrpn's own text files (configs, reports, splits, findings) are UTF-8 whatever the locale:
    on a machine whose locale encoding is ASCII or cp1252 (or after a library such as GDCM has set
    the process locale to "C"), Python's default would misread or refuse a class name like this."""
    config = tmp_path / "läsionen.yaml"
    config.write_text("# Läsionen ≥ 3 mm\ndata:\n  class_names: [Läsion, Knötchen]\n", encoding="utf-8")
    script = (
        "import locale, sys\n"
        "from medrpn.commands.config_parser import read_yaml\n"
        "print(locale.getpreferredencoding(False))\n"
        "print(read_yaml(sys.argv[1])['data']['class_names'] == ['L\\u00e4sion', 'Kn\\u00f6tchen'])\n"
    )
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, encoding="utf-8", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    encoding, same = result.stdout.split()
    assert encoding.lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")  # the premise: an ASCII locale
    assert same == "True"
