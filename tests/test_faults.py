"""Faults that real runs hit, each survived or named: a rank whose batch has no boxes (2 gloo processes, denoising and
distillation on), non-finite losses under fp16's skip policy, a run killed while saving a checkpoint, a store write
that fails while caching (disk full), and a cache shard damaged after the job finished (found, named, repaired)."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtcodetr.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMMON = ["batch_size=4", "num_workers=0", "image_size=[128, 128]", "log_with=[]", "optim.warmup_steps=2",
          "optim.ema_warmup=5", "eval_every=0"]
NO_AUG = ["aug.photometric_p=0", "aug.zoom_out_p=0", "aug.iou_crop_p=0", "aug.flip_p=0"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_cfg(*words: str):
    from rtcodetr.train_student.config import TrainConfig

    return load_config(TrainConfig, None, [*COMMON, *words])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _raw(path) -> dict[str, np.ndarray]:
    from rtcodetr.cache_teacher.storage import open_group

    g = open_group(str(path), "r")
    return {name: np.asarray(g[name][:]) for name in g.array_keys()}


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset.json").read_text())
    info["image_root"] = str(dst / "images")
    (dst / "dataset.json").write_text(json.dumps(info))
    return dst


# ------------------------------------------------------------------------------------------ batches without boxes


@pytest.mark.slow
def test_two_processes_train_on_when_one_rank_has_no_boxes(tmp_path, synthetic_data, tiny_model_dir):
    """Rank 1's first batch has no boxes, rank 0's has some; denoising (RT-DETR's num_denoising) and distillation
    from a cache are on. Without the fix the ranks' DDP gradient buckets disagree (the denoising embedding is out of
    rank 1's graph) and the first backward hangs; with the embedding kept in, the per-rank loss dicts still differ
    (no denoising parts on rank 1) and the logging all-reduce failed on mismatched sizes."""
    from transformers import AutoConfig

    from rtcodetr.cache_teacher import CacheConfig, run
    from rtcodetr.train_student.sampling import EpochBatchSampler

    model = tiny_model_dir("rtdetr-tiny")
    assert AutoConfig.from_pretrained(model).num_denoising > 0
    data = _copy_data(synthetic_data.root, tmp_path / "data")
    coco = json.loads((data / "train.json").read_text())
    sampler = EpochBatchSampler(len(coco["images"]), 2, seed=0, rank=1, world=2)
    sampler.set_epoch(0)
    empty = {coco["images"][i]["id"] for i in next(iter(sampler))}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    (data / "train.json").write_text(json.dumps(coco))
    rank0 = EpochBatchSampler(len(coco["images"]), 2, seed=0, rank=0, world=2)
    rank0.set_epoch(0)
    rank0_ids = {coco["images"][i]["id"] for i in next(iter(rank0))}
    assert any(a["image_id"] in rank0_ids for a in coco["annotations"])  # the ranks differ: one has boxes
    cache = tmp_path / "cache"
    run(load_config(CacheConfig, None, [f"data={data}", f"teacher={model}", f"out={cache}", "num_workers=0",
                                        "progress=false", "dtype=float32", "geometry.size_hw=[128,128]"]))

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rtcodetr.train_student",
           f"data={data}", f"model={model}", f"cache={cache}", f"out={out}", "max_steps=3", "cpu=true",
           "loss.feature_weight=1", "loss.prediction_weight=1", "log_every=1", "checkpoint_every=2",
           *[c.replace("batch_size=4", "batch_size=2") for c in COMMON], *NO_AUG]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:  # the failure mode of lyuwenyu/RT-DETR#672: a silent DDP hang
        pytest.fail(f"two-process training hung on a batch without boxes: {str(e.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and results["num_processes"] == 2
    # both processes wrote their part of the checkpoint before it got its final name
    ckpt = out / "checkpoints" / "step_2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    assert {"train_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}
    first = next(r for r in _rows(out) if r["type"] == "train")
    # denoising parts come from rank 0 alone at step 1 and are averaged over the ranks that have them
    assert np.isfinite(first["loss/det/loss_vfl_dn_0"]) and np.isfinite(first["loss/feature"])


# ------------------------------------------------------------------------------------------- non-finite losses


def test_nonfinite_policy_follows_precision():
    from rtcodetr.train_student.engine import nonfinite_policy

    assert nonfinite_policy("auto", "fp16") == "skip"
    assert nonfinite_policy("auto", "bf16") == "stop" and nonfinite_policy("auto", "no") == "stop"
    assert nonfinite_policy("stop", "fp16") == "stop" and nonfinite_policy("skip", "no") == "skip"


def _nan_on_calls(monkeypatch, calls: set[int] | None):
    """Make the criterion's detection loss NaN on the given (0-based) calls, or on every call (None)."""
    from rtcodetr.train_student import train as trainer

    original = trainer.DistillCriterion.forward
    seen = {"n": 0}

    def forward(self, outputs, student_map, batch, *rest):
        losses = original(self, outputs, student_map, batch, *rest)
        if calls is None or seen["n"] in calls:
            losses["detection"] = losses["detection"] * float("nan")
        seen["n"] += 1
        return losses

    monkeypatch.setattr(trainer.DistillCriterion, "forward", forward)


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, synthetic_data, tiny_model_dir, monkeypatch,
                                                      one_thread):
    """The fp16 path on a CPU: nonfinite=skip (what ``auto`` resolves to under fp16). Step 2's loss is NaN: no update,
    the run goes on to its last step, metrics.jsonl and results.json say which step and how many."""
    from rtcodetr.train_student import train as trainer

    _nan_on_calls(monkeypatch, {1})
    out = tmp_path / "skip"
    result = trainer.run(_train_cfg(f"data={synthetic_data.root}", f"model={tiny_model_dir('rtdetr-tiny')}",
                                    f"out={out}", "max_steps=4", "nonfinite=skip"))
    assert result["steps"] == 4 and result["nonfinite_skipped_steps"] == 1
    rows = _rows(out)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 3, 4]
    skipped = [r for r in rows if r["type"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and skipped[0]["loss_parts"]["detection"] is None  # NaN
    assert next(r for r in rows if r["step"] == 3)["nonfinite_skipped"] == 1
    assert json.loads((out / "results.json").read_text())["nonfinite_skipped_steps"] == 1


def test_nonfinite_skip_still_stops_when_it_repeats(tmp_path, synthetic_data, tiny_model_dir, monkeypatch,
                                                    one_thread):
    from rtcodetr.train_student import train as trainer

    _nan_on_calls(monkeypatch, None)
    with pytest.raises(trainer.NonFiniteLossError, match=r"3 steps in a row were non-finite \(max_nonfinite_steps=3"):
        trainer.run(_train_cfg(f"data={synthetic_data.root}", f"model={tiny_model_dir('rtdetr-tiny')}",
                               f"out={tmp_path / 'r'}", "max_steps=6", "nonfinite=skip", "max_nonfinite_steps=3"))
    assert [r["step"] for r in _rows(tmp_path / "r") if r["type"] == "skipped"] == [1, 2]


# ------------------------------------------------------------------------------------ killed while checkpointing


def test_checkpoint_killed_while_saving_is_never_resumed(tmp_path, synthetic_data, tiny_model_dir, monkeypatch,
                                                         one_thread):
    """The run is killed halfway through writing step 2's train_state.json. Before the fix the half-written
    checkpoints/step_2 was the newest one and resume=auto died on its truncated JSON; now it was still called
    .step_2.partial, so resume=auto takes step_1 and finishes, and the leftover is cleaned up."""
    from rtcodetr.train_student import train as trainer
    from rtcodetr.train_student.checkpoints import find_checkpoint

    original = Path.write_text
    state = {"saves": 0}

    def write_text(self, data, *args, **kwargs):
        if self.name == "train_state.json":
            state["saves"] += 1
            if state["saves"] == 2:
                original(self, data[: len(data) // 2], *args, **kwargs)
                raise KeyboardInterrupt("killed while saving")
        return original(self, data, *args, **kwargs)

    common = [f"data={synthetic_data.root}", f"model={tiny_model_dir('rtdetr-tiny')}", f"out={tmp_path / 'run'}",
              "max_steps=3", "checkpoint_every=1", "keep_checkpoints=5"]
    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(_train_cfg(*common))
    monkeypatch.setattr(Path, "write_text", original)
    ckpts = tmp_path / "run" / "checkpoints"
    assert find_checkpoint(tmp_path / "run", "auto") == ckpts / "step_1"
    result = trainer.run(_train_cfg(*common, "resume=auto"))
    assert result["steps"] == 3 and not result["interrupted"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_1", "step_2", "step_3"]  # no .partial left
    assert json.loads((ckpts / "step_2" / "train_state.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------- write error while caching


def test_write_error_names_the_shard_keeps_finished_ones_and_resumes(tmp_path, synthetic_data, tiny_model_dir,
                                                                    monkeypatch, capsys):
    """The store refuses shard 2's encoder object with ENOSPC (a full disk): the job stops with exit 1 and one
    message naming the shard, shards 0 and 1 stay marked, and the same command then writes only shards 2 and 3."""
    from zarr.storage import LocalStore

    from rtcodetr.cache_teacher.cli import main as cache_main
    from rtcodetr.cache_teacher.storage import finished_shards, open_group

    out = tmp_path / "cache"
    argv = ["--data", str(synthetic_data.root), "--teacher", str(tiny_model_dir("rtdetr-tiny")), "--out", str(out),
            "samples_per_shard=4", "batch_size=4", "num_workers=0", "progress=false", "dtype=float32",
            "geometry.size_hw=[128,128]"]
    original = LocalStore.set

    async def full_disk(self, key, value):
        if key.startswith("encoder/c/2/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    assert cache_main(argv) == 1
    err = capsys.readouterr().err
    assert "shard 2 (samples 8-11) of array 'encoder'" in err and "No space left on device" in err
    assert "Traceback" not in err and "2/4 shards are finished and kept" in err
    assert finished_shards(open_group(str(out), "r")).tolist() == [True, True, False, False]
    monkeypatch.setattr(LocalStore, "set", original)
    assert cache_main(argv) == 0
    assert "wrote 2 shard(s)" in capsys.readouterr().err
    assert finished_shards(open_group(str(out), "r")).all()


# --------------------------------------------------------------------------------------------- a damaged cache


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_shard_is_named_by_verify_and_repaired_by_redo_shards(tmp_path, small_cache, capsys, one_thread):
    """A shard file cut in half after the job finished (a copy that stopped) and another shard's object deleted:
    `verify` (cheap and --full) names both shards, their samples and image ids and prints the repair command; that
    command recomputes only those shards, after which the cache equals the undamaged one (byte for byte: both made on
    one thread, see the small_cache fixture)."""
    from rtcodetr.cache_teacher import CacheCorruptError, TeacherCache
    from rtcodetr.cache_teacher.cli import main as cache_main

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    _truncate(cache / "encoder" / "c" / "1" / "0" / "0" / "0")
    (cache / "logits" / "c" / "3" / "0" / "0").unlink()
    ids = TeacherCache(cache).image_ids
    for full in ([], ["--full"]):
        assert cache_main(["verify", str(cache), *full]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        err = "\n".join(line for line in err.splitlines() if "error:" in line)  # (--full also draws a progress bar)
        assert len(err.splitlines()) == 1
        assert f"shard 1 (samples 4-7, image ids {', '.join(str(i) for i in ids[4:8])})" in err
        assert "encoder: ValueError" in err and "shard 3 (samples 12-15" in err and "logits: object missing" in err
        assert "--redo-shards 1,3" in err
    with pytest.raises(CacheCorruptError) as e:
        TeacherCache(cache).check_integrity()
    assert e.value.shards == [1, 3]
    fix = shlex.split(err.split("Fix: recompute only these shards with: ")[1])
    assert fix[:2] == ["rtcodetr", "cache-teacher"] and "geometry.size_hw=[128, 128]" in fix
    # a read that reaches the damaged shard mid-epoch names it the same way
    with pytest.raises(CacheCorruptError, match=r"shard 1 \(samples 4-7.*--redo-shards 1"):
        TeacherCache(cache)[5]
    # ... also from a DataLoader worker, whose re-raise wraps the worker's traceback into the message: the CLI's one
    # line keeps only the original message
    from rtcodetr.errors import one_line

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(TeacherCache(cache), [5]), batch_size=None,
                                         num_workers=1)
    with pytest.raises(CacheCorruptError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)
    assert one_line(e.value).startswith("teacher cache ") and "--redo-shards 1" in one_line(e.value)
    assert "Traceback" not in one_line(e.value)
    mtime = (cache / "encoder" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    assert cache_main([*fix[2:], "progress=false", "num_workers=0"]) == 0
    assert "shards [1, 3] are recomputed" in capsys.readouterr().err
    assert (cache / "encoder" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == mtime  # shard 0 untouched
    assert cache_main(["verify", str(cache), "--full"]) == 0
    ref, got = _raw(small_cache), _raw(cache)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_trainer_stops_before_its_first_step_on_a_damaged_cache(tmp_path, synthetic_data, tiny_model_dir, small_cache,
                                                               capsys, one_thread):
    """The trainer's pre-flight check finds the truncated shard before any step (no metrics written), with the same
    message and exit code 2 -- not mid-epoch inside a DataLoader worker."""
    from rtcodetr.train_student.train import main as train_main

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    _truncate(cache / "encoder" / "c" / "2" / "0" / "0" / "0")
    out = tmp_path / "run"
    rc = train_main([f"data={synthetic_data.root}", f"model={tiny_model_dir('rtdetr-tiny')}", f"cache={cache}",
                     f"out={out}", "loss.feature_weight=1", "max_steps=2", *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "shard 2 (samples 8-11" in err and "--redo-shards 2" in err
    assert not (out / "metrics.jsonl").exists()


def test_float16_overflow_names_the_image_and_the_setting(tmp_path):
    """A teacher map beyond float16's range (65504) is a config problem with a one-line fix, not a writer-thread
    traceback: ConfigError (exit 2 from the CLI) naming the tensor, the image id and dtype=bfloat16."""
    from rtcodetr.cache_teacher.storage import ShardWriter, create_cache, finished_shards
    from rtcodetr.config import ConfigError

    manifest = {"dataset": {"image_ids": [100, 101, 102, 103]},
                "storage": {"samples_per_shard": 2, "compressor": {"name": "none", "level": 0}},
                "tensors": {"encoder": {"shape": [2, 3, 3], "dtype": "float16", "scale": None}}}
    group = create_cache(str(tmp_path / "c"), manifest, overwrite=False)
    writer = ShardWriter(group, manifest)
    meta = {"valid": np.full((2, 2), 3), "input_hw": np.full((2, 2), 96)}
    writer.submit(np.arange(2), {"encoder": np.ones((2, 2, 3, 3), np.float32)}, {**meta, "image_id": [100, 101]})
    big = np.ones((2, 2, 3, 3), np.float32)
    big[1, 0, 0, 0] = 1e5
    writer.submit(np.arange(2, 4), {"encoder": big}, {**meta, "image_id": [102, 103]})
    with pytest.raises(ConfigError, match=r"'encoder' of image id 103 reaches 1e\+05, beyond float16.*dtype=bfloat16"):
        writer.close()
    assert finished_shards(group).tolist() == [True, False]
