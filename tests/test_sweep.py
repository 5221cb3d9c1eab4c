"""The sweep end to end at toy size: 2 arms x 2 seeds, each run a real `accelerate launch` of the trainer reading one
teacher cache, evaluated into one table; a restart trains only the run that had not finished."""
import json

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, synthetic_data, tiny_model_dir):
    from rtcodetr.cache_teacher import CacheConfig, run
    from rtcodetr.config import load_config

    out = tmp_path_factory.mktemp("sweep_cache") / "train.zarr"
    cfg = load_config(CacheConfig, None, [f"data={synthetic_data.root}", "split=train",
                                          f"teacher={tiny_model_dir('rtdetr-small')}", f"out={out}",
                                          "num_workers=0", "dtype=float32", "progress=false"])
    run(cfg)
    return out


def test_sweep_two_arms_two_seeds_and_restart(tmp_path, synthetic_data, tiny_model_dir, toy_cache, capsys):
    from rtcodetr.sweep import main

    cfg = {
        "data": str(synthetic_data.root),
        "model": str(tiny_model_dir("rtdetr-tiny")),
        "cache": str(toy_cache),
        "out": str(tmp_path / "sweep"),
        "train_config": "configs/demo_student.yaml",
        "train_overrides": ["max_steps=2", "batch_size=4", "num_workers=0", "image_size=[128, 128]",
                            "eval_every=0", "checkpoint_every=0", "log_with=[]"],
        "seeds": [0, 1],
        "launcher": "accelerate",
        "parallel": 2,  # two runs at once: the pool, its logs and its bookkeeping
        "launch_args": ["--num_processes", "1", "--num_cpu_threads_per_process", "1"],
        "baseline_arm": "baseline",
        "arms": {"baseline": {"cache": None, "loss": {"feature_weight": 0.0, "prediction_weight": 0.0}},
                 "both": {"loss": {"feature_weight": 1.0, "prediction_weight": 1.0}}},
    }
    cfg_file = tmp_path / "ablation.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_file)]) == 0

    out = tmp_path / "sweep"
    result = json.loads((out / "sweep.json").read_text())
    assert set(result["metrics"]) == {"baseline", "both"}
    for arm in ("baseline", "both"):
        for seed in ("0", "1"):
            run_dir = out / "runs" / arm / f"seed{seed}"
            assert (run_dir / "results.json").is_file() and (run_dir / "best" / "config.json").is_file()
            assert result["runs"][arm][seed]["status"] == "trained"
            m = result["metrics"][arm][seed]
            assert 0.0 <= m["mAP"] <= 1.0
            run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert run_cfg["seed"] == int(seed) and run_cfg["max_steps"] == 2
            assert (run_cfg["cache"] is None) == (arm == "baseline")
    table = (out / "sweep.md").read_text()
    assert "| baseline | 2 |" in table and "| both | 2 |" in table and "vs baseline" in table
    both = result["table"]["both"]
    assert both["delta_mAP"] == pytest.approx(both["mAP"][0] - result["table"]["baseline"]["mAP"][0])

    # restart: one run lost its results (killed before the end); only that one trains again
    (out / "runs" / "both" / "seed1" / "results.json").unlink()
    kept = (out / "runs" / "baseline" / "seed0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--config", str(cfg_file)]) == 0
    again = json.loads((out / "sweep.json").read_text())
    statuses = {(a, s): again["runs"][a][s]["status"] for a in ("baseline", "both") for s in ("0", "1")}
    assert statuses == {("baseline", "0"): "skipped (finished)", ("baseline", "1"): "skipped (finished)",
                        ("both", "0"): "skipped (finished)", ("both", "1"): "trained"}
    assert (out / "runs" / "baseline" / "seed0" / "results.json").stat().st_mtime_ns == kept
    assert "finished earlier, not rerun" in capsys.readouterr().out
