"""LUM's two speed-ups: packing users into rows for pretraining (step 1), and the group query
(step 2), each against the plain way measured in the same run.

- step 1: a training step (forward + backward) over a batch of users whose sequences have
  lengths drawn from a long-tailed distribution (most far below the maximum), one user per
  padded row (baseline) vs packed into rows of the maximum length;
- step 2: N query conditions per user, N separate passes over history + one query
  (baseline) vs one group-query pass (prefix once, queries masked from one another).

    python benchmarks/lum_packing.py
    python benchmarks/lum_packing.py --size L4H128A4 --users 256 --queries 8

The paper reports +82% (step 1) and +78% (step 2) in its industrial setting (LUM, Table 6).
"""

from __future__ import annotations

import argparse
import time

import torch
from torchrec import KeyedJaggedTensor


def sequences(users: int, max_events: int, items: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    # Long-tailed lengths: most users far below the cap, as in behaviour logs.
    lengths = (torch.distributions.Exponential(1 / (max_events / 5)).sample((users,)) + 2).long()
    lengths = lengths.clamp(max=max_events)
    n = int(lengths.sum())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "liked"],
        values=torch.cat([torch.randint(0, items, (n,), generator=g), torch.randint(0, 2, (n,))]),
        lengths=torch.cat([lengths, lengths]),
    )


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="L4H64A4")
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--max-events", type=int, default=100)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from recsys.models.lum import LUM, LUMConfig
    from recsys.models.tower import TowerConfig

    torch.manual_seed(0)
    tokens = 2 * args.max_events
    config = LUMConfig(
        TowerConfig.from_name(args.size, max_len=tokens + 1), items=5000, conditions={"liked": 2}
    )
    lum = LUM(config)
    batch = sequences(args.users, args.max_events, config.items, 0)
    events = batch.lengths()[: args.users]
    print(
        f"{args.size}, {args.users} users, events per user {int(events.min())}–"
        f"{int(events.max())} (mean {events.float().mean():.1f}), rows of {tokens} tokens"
    )

    def step(pack_to):
        def run():
            lum.zero_grad()
            lum(batch, pack_to=pack_to).loss.backward()

        return run

    padded = best_of(args.repeats, step(None))
    packed = best_of(args.repeats, step(tokens))
    print("step 1, training step (users/s):")
    print(f"  one user per padded row  {args.users / padded:>10,.1f}   1.00x")
    print(f"  packed rows              {args.users / packed:>10,.1f} {padded / packed:6.2f}x")

    lum.eval()
    conditions = torch.arange(args.queries) % 2
    separate = best_of(
        args.repeats,
        lambda: [lum.query(batch, {"liked": conditions[j : j + 1]}) for j in range(args.queries)],
    )
    grouped = best_of(args.repeats, lambda: lum.query(batch, {"liked": conditions}))
    rate = args.users * args.queries
    print(f"step 2, {args.queries} queries per user (queries/s):")
    print(f"  separate passes          {rate / separate:>10,.1f}   1.00x")
    print(f"  group query              {rate / grouped:>10,.1f} {separate / grouped:6.2f}x")


if __name__ == "__main__":
    main()
