"""DistributedDataParallel on the CPU: 2 gloo processes under torchrun match one process."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from afmp import distributed as ddp
from afmp.train import TrainConfig, train

# 160 synthetic images: 112 train, 16 val, 32 test; 7 global batches of 16 per epoch.
COMMON = dict(
    dataset="synthetic",
    data_opts={"num_samples": 160, "img_size": 8},
    epochs=2,
    batch_size=16,
    device="cpu",
    model_opts={"d_model": 32, "use_top_down": False},  # top-down off: unused parameters under DDP
)


def test_train_sampler_shards_are_the_global_batches():
    data = list(range(30))
    one = ddp.train_sampler(data, ddp.DistEnv(0, 1), seed=7)
    two = [ddp.train_sampler(data, ddp.DistEnv(r, 2), seed=7) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    order = list(one)
    shards = [list(s) for s in two]
    # Global batch k of 6 = local batches k of 3 on each rank.
    for k in range(5):
        assert sorted(shards[0][3 * k : 3 * k + 3] + shards[1][3 * k : 3 * k + 3]) == sorted(
            order[6 * k : 6 * k + 6]
        )
    assert list(one) == order  # the permutation depends on seed and epoch only


def test_shard_sampler_and_helpers_without_a_process_group():
    shards = [list(ddp.ShardSampler(range(7), ddp.DistEnv(r, 3))) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert ddp.all_reduce_sum([1.5, 2], torch.device("cpu")) == [1.5, 2]
    assert ddp.local_batch_size(64, ddp.DistEnv(1, 4)) == 16
    with pytest.raises(ValueError, match="global batch"):
        ddp.local_batch_size(10, ddp.DistEnv(0, 4))
    env = ddp.env_from_environ()
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)


def test_two_processes_match_one(tmp_path):
    single = train(TrainConfig(out=str(tmp_path / "one"), tensorboard=True, **COMMON))
    assert list((tmp_path / "one" / "tb").glob("events.out.tfevents.*"))  # --tensorboard logs there

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "afmp.train", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "16"]
    cmd += ["--data-opt", "num_samples=160", "--data-opt", "img_size=8", "--device", "cpu", "--out", str(out)]
    cmd += ["-o", "d_model=32", "-o", "use_top_down=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("best val") == 1  # rank 0 alone prints

    a, b = load_file(str(tmp_path / "one" / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)
    double = json.loads((out / "results.json").read_text())
    for key in ("train_loss", "train_acc", "val_acc"):  # metrics all-reduced over both shards
        assert double["training_history"][key] == pytest.approx(single["training_history"][key], abs=1e-4)
    assert double["test_accuracy"] == pytest.approx(single["test_accuracy"])
    with open(out / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
