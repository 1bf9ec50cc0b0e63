"""DistributedDataParallel on the CPU: 2 gloo processes under torchrun match one process."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from afmp.training import distributed as ddp
from afmp.training.train import TrainConfig, train

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
    cmd += ["-m", "afmp.commands.train", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "16"]
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


def test_length_grouped_sampler_batches_the_sorted_pool():
    # One pool of 7: sorted by length 7,6,5,4,3,2,1 (indices 6,5,0,2,4,3,1) and cut in twos;
    # the three full batches in a shuffled order, the short one last.
    lengths = [5, 1, 4, 2, 3, 6, 7]
    sampler = ddp.LengthGroupedSampler(lengths, 2, ddp.DistEnv(0, 1), seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(7)) and order[-1] == 1
    assert sorted(sorted(order[k : k + 2]) for k in (0, 2, 4)) == [[0, 2], [3, 4], [5, 6]]
    assert list(sampler) == order  # seed and epoch fix it
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1  # the batches' order changes with the epoch


def test_length_grouped_sampler_with_pools_of_one_batch_regroups_train_samplers_batches():
    # Pools of one batch only sort within each batch: the batches are train_sampler's (the
    # same permutation of seed + epoch), in another order.
    lengths = torch.randint(1, 50, (30,), generator=torch.Generator().manual_seed(0))
    plain = ddp.train_sampler(list(range(30)), ddp.DistEnv(0, 1), seed=7)
    grouped = ddp.LengthGroupedSampler(lengths, 6, ddp.DistEnv(0, 1), seed=7, pool=1)
    for s in (plain, grouped):
        s.set_epoch(2)
    batches = lambda order: sorted(sorted(order[k : k + 6]) for k in range(0, 30, 6))  # noqa: E731
    assert batches(list(grouped)) == batches(list(plain))
    assert list(grouped) != list(plain)


def test_length_grouped_sampler_shards_are_the_global_batches():
    lengths = torch.randint(1, 99, (45,), generator=torch.Generator().manual_seed(1))
    one = ddp.LengthGroupedSampler(lengths, 6, ddp.DistEnv(0, 1), seed=7, pool=3)
    two = [ddp.LengthGroupedSampler(lengths, 6, ddp.DistEnv(r, 2), seed=7, pool=3) for r in range(2)]
    order, shards = list(one), [list(s) for s in two]
    assert len(one) == 45 and [len(s) for s in two] == [23, 23]  # 45 is padded to 46 over 2 ranks
    for k in range(7):  # global batch k of 6 = local batches k of 3 on each rank
        local = shards[0][3 * k : 3 * k + 3] + shards[1][3 * k : 3 * k + 3]
        assert sorted(local) == sorted(order[6 * k : 6 * k + 6])
    # Each batch is a run of one pool (18 of the permutation of seed 7) sorted by length: no
    # other example of its pool is strictly shorter than its longest and longer than its shortest.
    pools = [
        set(p.tolist()) for p in torch.randperm(45, generator=torch.Generator().manual_seed(7)).split(18)
    ]
    for k in range(8):
        batch = order[6 * k : 6 * k + 6]
        pool = next(p for p in pools if set(batch) <= p)
        low, high = lengths[batch].min(), lengths[batch].max()
        assert not [i for i in pool - set(batch) if low < lengths[i] < high]
    with pytest.raises(ValueError, match="one length per example"):
        ddp.LengthGroupedSampler([[1, 2]], 6, ddp.DistEnv(0, 1), seed=0)
