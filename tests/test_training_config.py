"""The training config: each YAML value is checked against its field's type, with an error naming the key."""

import re

import pytest

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.training.config import load_config

BASE = "model: models/cc\noutput: runs/a\nhid_weight: 0\n"


def config_from(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return load_config(path)


def test_numbers_as_yaml_writes_them(tmp_path):
    config = config_from(tmp_path, BASE + "lr: 5e-5\nwarmup_steps: 0\nhid_lambda: 1\ndata: {csv: null}\n")
    assert config.lr == 5e-5 and type(config.lr) is float  # YAML 1.1 reads 5e-5 (no dot) as a string
    assert config.hid_lambda == 1.0 and type(config.hid_lambda) is float  # an int where a float goes
    assert config.warmup_steps == 0 and config.data.csv is None and config.arcface is None  # null for optional ones
    assert config_from(tmp_path, BASE + "lr: '1E-4'\nema_decay: 0.999\n").lr == 1e-4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: 2.5", "steps must be a whole number, got 2.5 (float)"),
        ("steps: true", "steps must be a whole number, got True (bool)"),  # bool is an int in Python
        ("data: {augment: 'no'}", "data.augment must be true or false, got 'no' (str)"),
        ("data: {augment: 1}", "data.augment must be true or false, got 1 (int)"),
        ("lr: fast", "lr must be a finite number, got 'fast' (str)"),
        ("lr: .nan", "lr must be a finite number, got nan (float)"),
        ("lr: nan", "lr must be a finite number, got nan (float)"),  # a string that float() reads
        ("ema_decay: .inf", "ema_decay must be a finite number, got inf (float)"),
        ("hid_weight: -.inf", "hid_weight must be a finite number, got -inf (float)"),
        ("lr: true", "lr must be a finite number, got True (bool)"),
        ("model: 5", "model must be text, got 5 (int)"),
        ("data: {csv: [a.csv]}", "data.csv must be text or null, got ['a.csv'] (list)"),
        ("data: {size: null}", "data.size must be a whole number, got None (NoneType)"),
        ("seed: -3", "seed must be from 0 to 4294967295 (2**32 - 1), got -3"),
        ("seed: 1000000000000000", "seed must be from 0 to 4294967295 (2**32 - 1), got 1000000000000000"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(tmp_path, text, message):
    with pytest.raises(RefFaceError, match=re.escape("the training config has problems:\n  " + message)):
        config_from(tmp_path, BASE + text + "\n")


def test_every_wrong_value_is_listed_at_once(tmp_path):
    with pytest.raises(RefFaceError) as error:
        config_from(tmp_path, BASE + "steps: 2.5\nlr: .nan\ndata: {workers: '2'}\n")
    assert str(error.value).splitlines()[1:] == [
        "  data.workers must be a whole number, got '2' (str)",
        "  steps must be a whole number, got 2.5 (float)",
        "  lr must be a finite number, got nan (float)",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- model: a\n- output: b\n",
            r"the training config .*train.yaml must be a mapping \(`key: value` lines\), got a list",
        ),
        ("just words\n", "the training config .*train.yaml must be a mapping .*, got a str"),
        (BASE + "data: [1, 2]\n", r"`data:` in .*train.yaml must be a mapping \(`key: value` lines\), got a list"),
        (BASE + "data: photos/\n", "`data:` in .*train.yaml must be a mapping .*, got a str"),
        (BASE + "1: 2\n", "unknown training config keys: 1"),
        ("", "the training config is incomplete"),
    ],
)
def test_a_config_that_is_not_a_mapping_is_named(tmp_path, text, message):
    with pytest.raises(RefFaceError, match=message):
        config_from(tmp_path, text)


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(RefFaceError, match="cannot read the training config .*train.yaml: 'utf-8' codec"):
        load_config(path)
    (tmp_path / "train.yaml").write_text(BASE + "lr: .nan\n")
    assert main(["train", "--config", str(path)]) == 1
    error = capsys.readouterr().err
    assert "lr must be a finite number" in error and "Traceback" not in error
