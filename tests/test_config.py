from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rtcodetr.config import ConfigError, load_config, save_config, split_overrides


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    data: str = ""
    max_steps: int | None = None
    batch_size: int = 4
    amp: bool = False
    mode: str = "mse"
    optim: Optim = field(default_factory=Optim)


def test_layers_defaults_yaml_and_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 8\noptim:\n  lr: 0.001\n")
    cfg = load_config(Cfg, f, ["max_steps=20", "optim.betas=[0.5, 0.6]", "amp=true"])
    assert load_config(Cfg, None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.batch_size == 8 and cfg.optim.lr == 0.001 and cfg.max_steps == 20
    assert cfg.optim.betas == (0.5, 0.6) and cfg.amp is True
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(Cfg, tmp_path / "out.yaml")
    assert again == cfg


def test_unknown_key_names_key_and_closest(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"'batch_sise'.*command line.*did you mean 'batch_size'"):
        load_config(Cfg, None, ["batch_sise=3"])
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*c.yaml.*'optim.lr'"):
        load_config(Cfg, f)


def test_bad_type_is_an_error():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(Cfg, None, ["batch_size=abc"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(Cfg, None, ["amp=3"])


def test_split_overrides():
    flags, over = split_overrides(["--config", "x.yaml", "a=1", "--flag", "b.c=2"])
    assert flags == ["--config", "x.yaml", "--flag"] and over == ["a=1", "b.c=2"]


def test_literal_no_is_not_read_as_false():
    """YAML 1.1 reads `no` as false; `mixed_precision=no` (a Literal of strings) must still mean 'no'."""
    from rtcodetr.train_student.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["mixed_precision=no", "loss.feature_loss=mse"])
    assert cfg.mixed_precision == "no"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(TrainConfig, None, ["mixed_precision=yes"])
