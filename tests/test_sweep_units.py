"""Unit checks of the sweep's bookkeeping (the end-to-end sweep test lives in test_sweep.py)."""
import pytest
import torch

from rtcodetr.sweep import SweepConfig, flatten_overrides, format_table, mean_std, summarize_arms, train_command


def test_flatten_overrides_nested_and_null():
    words = flatten_overrides({"loss": {"feature_weight": 0.0, "mode": "pkd"}, "cache": None, "sizes": [1, 2]})
    assert words == ["loss.feature_weight=0.0", "loss.mode=pkd", "cache=null", "sizes=[1, 2]"]


def test_mean_std_and_paired_delta():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and s == pytest.approx(2 ** 0.5)
    per_run = {"baseline": {0: {"mAP": 0.2, "mAP50": 0.4}, 1: {"mAP": 0.3, "mAP50": 0.5}},
               "both": {0: {"mAP": 0.25, "mAP50": 0.5}, 1: {"mAP": 0.36, "mAP50": 0.5}}}
    table = summarize_arms(per_run, "baseline")
    assert table["both"]["delta_mAP"] == pytest.approx(0.055)
    assert table["both"]["paired_delta_mAP"][0] == pytest.approx(0.055)
    assert table["both"]["paired_delta_mAP"][1] == pytest.approx(abs(0.05 - 0.06) / 2 ** 0.5)
    text = format_table(table, "baseline")
    assert "| both | 2 |" in text and "+0.0550" in text


def test_train_command_is_explicit():
    cfg = SweepConfig(data="d", model="m", cache="c", out="o", train_config="t.yaml",
                      arms={"baseline": {"loss": {"feature_weight": 0}}}, launch_args=["--num_processes", "2"])
    cmd = train_command(cfg, "baseline", 3)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"]
    assert cmd[cmd.index("--config") + 1] == "t.yaml"
    assert "seed=3" in cmd and "loss.feature_weight=0" in cmd and "resume=auto" in cmd
    assert any(w.endswith("runs/baseline/seed3") for w in cmd if w.startswith("out="))


def test_init_per_seed_varies_the_student_weights_and_is_shared_by_arms(tmp_path, synthetic_data):
    from safetensors.torch import load_file

    from rtcodetr.sweep import student_init

    cfg = SweepConfig(data=str(synthetic_data.root), init_preset="rtdetr-tiny", out=str(tmp_path / "sweep"),
                      arms={"baseline": {}, "feature": {"loss": {"feature_weight": 1}}})
    a0, a1 = student_init(cfg, 0), student_init(cfg, 1)
    assert a0 != a1 and student_init(cfg, 0) == a0  # written once, then reused by every arm of seed 0
    w0, w1 = load_file(f"{a0}/model.safetensors"), load_file(f"{a1}/model.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for arm in cfg.arms:  # every arm of a seed trains from that seed's init
        assert f"model={a1}" in train_command(cfg, arm, 1)


def test_sweep_refuses_ambiguous_init_and_unknown_checkpoint(tmp_path):
    from rtcodetr.config import ConfigError
    from rtcodetr.sweep import run

    base = dict(data="d", out=str(tmp_path), train_config="t.yaml", arms={"baseline": {}})
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        run(SweepConfig(model="m", init_preset="rtdetr-tiny", **base))
    with pytest.raises(ConfigError, match="'best' or 'final'"):
        run(SweepConfig(model="m", checkpoint="last", **base))


@pytest.mark.parametrize("name", ["ablation_demo", "ablation_semi"])
def test_ablation_demo_trains_the_demos_students(name):
    """configs/ablation_{demo,semi}.yaml must measure the students `rtcodetr demo` trains: same trainer file, same
    settings, the demo's unlabelled cache."""
    from pathlib import Path

    from rtcodetr.config import load_config
    from rtcodetr.demo import DemoConfig

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(SweepConfig, repo / "configs" / f"{name}.yaml", [])
    demo = DemoConfig()
    assert Path(cfg.train_config).name == Path(demo.student_config).name
    assert cfg.init_preset == demo.student_preset and cfg.split == demo.eval_split
    words = dict(w.split("=", 1) for w in cfg.train_overrides)
    assert words["max_steps"] == str(demo.student_steps) and words["batch_size"] == str(demo.student_batch_size)
    assert words["image_size"] == f"[{demo.image_size}, {demo.image_size}]"
    assert words["num_workers"] == str(demo.num_workers)
    base = cfg.arms[cfg.baseline_arm]
    assert base["cache"] is None and base["loss"] == {"feature_weight": 0.0, "prediction_weight": 0.0}
    demo_out = Path(cfg.data).parent
    assert Path(cfg.cache) == demo_out / "cache" / "train.zarr"
    unlabeled = [a for a in cfg.arms.values() if a.get("unlabeled_split")]
    assert unlabeled and all(Path(a["unlabeled_cache"]) == demo_out / "cache" / f"{a['unlabeled_split']}.zarr"
                             for a in unlabeled)
    mirrored = [a for a in cfg.arms.values() if a.get("mirror_cache")]
    assert all(Path(a["mirror_cache"]) == demo_out / "cache" / "train_mirror.zarr" for a in mirrored)
    if name == "ablation_demo":
        assert mirrored  # the demo caches the train split on mirrored images too
        # the demo's distilled student: the shipped losses untouched, the mirror cache for flipped views
        assert cfg.arms["distill"] == {"mirror_cache": str(demo_out / "cache" / "train_mirror.zarr")}
        assert cfg.arms["distill_plain"] == {}
        assert set(cfg.arms) >= {"baseline", "feature", "prediction", "distill", "online"}
    else:
        assert cfg.arms["labelled_kd"] == {} and set(cfg.arms) >= {"labelled", "labelled_kd", "unlabeled_kd"}
