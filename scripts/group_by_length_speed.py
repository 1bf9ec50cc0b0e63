"""Training-step time with and without --group-by-length, in one process, on ListOps.

    OMP_NUM_THREADS=2 python3 scripts/group_by_length_speed.py --data-dir DIR [--model M]

DIR holds basic_{train,val,test}.tsv (`afmp listops generate`). Draws the first 40 batches
of 64 of epoch 0 from the plain shuffle and from the length-grouped sampler, then times one
training step (forward, loss, backward, AdamW) on each, in alternating blocks of 10, so that
a change of load hits both. Prints ms per step, padded tokens per row and the two ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import afmp.models  # noqa: F401  (registers the models)
from afmp.data import build_dataset
from afmp.registry import create_model
from afmp.training import distributed as ddp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="transformer_text_matched")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = build_dataset("listops", data_dir=args.data_dir, val_fraction=0.1, seed=0)
    env = ddp.DistEnv(0, 1)
    samplers = {
        "plain": ddp.train_sampler(data.train, env, seed=0),
        "grouped": ddp.train_sampler(data.train, env, seed=0, group_batch=64),
    }
    batches = {}
    for name, sampler in samplers.items():
        loader = DataLoader(data.train, batch_size=64, sampler=sampler, collate_fn=data.collate_fn)
        batches[name] = [batch for _, batch in zip(range(40), loader)]
    torch.manual_seed(0)
    model = create_model(args.model, **data.model_args)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

    def step(tokens, labels):
        loss = F.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for tokens, labels in batches["plain"][:3]:  # warm-up
        step(tokens, labels)
    seconds = dict.fromkeys(batches, 0.0)
    for block in range(4):
        for name in batches:
            for tokens, labels in batches[name][10 * block : 10 * block + 10]:
                started = time.perf_counter()
                step(tokens, labels)
                seconds[name] += time.perf_counter() - started
    width = {
        name: sum(t.numel() for t, _ in b) / sum(t.shape[0] for t, _ in b) for name, b in batches.items()
    }
    print(f"{args.model}, batch 64, {args.threads} threads, 40 steps each")
    for name in batches:
        print(f"{name:8s} {seconds[name] / 40 * 1000:7.1f} ms/step  {width[name]:5.1f} tokens/row")
    print(
        f"plain / grouped: {seconds['plain'] / seconds['grouped']:.2f}x the time, "
        f"{width['plain'] / width['grouped']:.2f}x the tokens"
    )


if __name__ == "__main__":
    main()
