"""A synthetic usage ledger for a policy, and how fast `switchboard policy simulate` replays it.

    .venv/bin/python loadtests/synthetic_ledger.py --policy policies/examples/limits.yaml --requests 300000 \\
        --days 30 --out /tmp/month.sqlite --simulate policies/examples/limits.yaml

Rows go through the ledger's own writer (gateway/accounting/ledger.py, `record(..., at=)`), spread uniformly over
`--days` ending now, for random (team, key, model) triples the policy allows, with prompts of 50-4000 and
completions of 10-1000 tokens, priced on the model's first route. With `--simulate NEW` the ledger is then
replayed against NEW (gateway/cli/simulate.py `replay`, `--workers N` processes) and the rate is printed.
"""

# ruff: noqa: T201 - a benchmark script: prints its report.
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.accounting.ledger import Ledger
from gateway.accounting.pricing import charge
from gateway.accounting.usage import UsageRecord
from gateway.cli.simulate import replay
from gateway.compiled.policy import load_policy
from providers.base import Usage


def write_ledger(policy_path: str, out: Path, requests: int, days: float, seed: int) -> None:
    policy = load_policy(policy_path)
    callers = [(entry, [name for name in policy.models if entry.team.may_use(name)])
               for entry in policy.keys.values()]
    callers = [(entry, models) for entry, models in callers if models]
    if not callers:
        raise SystemExit(f"{policy_path}: no key may use any model")
    rng = random.Random(seed)
    end = time.time()
    start = end - days * 86_400
    times = sorted(rng.uniform(start, end) for _ in range(requests))
    ledger = Ledger(out, flush_interval_s=0.2)
    for index, at in enumerate(times):
        entry, models = rng.choice(callers)
        model = policy.models[rng.choice(models)]
        target = model.targets[0]
        usage = Usage(rng.randint(50, 4000), rng.randint(10, 1000))
        cost, version = charge(policy.prices, target, usage)
        ledger.record(UsageRecord(
            request_id=f"synthetic-{index}", team=entry.team.name, key_id=entry.key_id, endpoint="chat",
            public_model=model.name, provider=target.provider.name, upstream_model=target.upstream_model,
            stream=False, status=200, usage=usage, duration_ms=500.0, overhead_ms=0.5, cost_usd=cost,
            price_version=version), at=at)
    ledger.close(timeout_s=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", required=True, help="the policy whose teams, keys and models the rows use")
    parser.add_argument("--out", required=True, type=Path, help="ledger file to write (appended to if it exists)")
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--simulate", default=None, help="replay the ledger against this policy and time it")
    parser.add_argument("--workers", type=int, default=1, help="replay processes (teams split among them)")
    args = parser.parse_args()
    started = time.perf_counter()
    write_ledger(args.policy, args.out, args.requests, args.days, args.seed)
    print(f"wrote {args.requests} rows over {args.days:g} days to {args.out} in "
          f"{time.perf_counter() - started:.1f}s")
    if args.simulate:
        started = time.perf_counter()
        result = replay(args.simulate, args.out, workers=args.workers)
        elapsed = time.perf_counter() - started
        totals = {name: sum(getattr(t, name) for t in result.tallies.values())
                  for name in ("rate_limited", "over_budget", "downgraded", "rerouted")}
        print(f"simulated {result.requests} requests against {args.simulate} with {args.workers} worker(s) "
              f"in {elapsed:.2f}s: "
              f"{result.requests / elapsed:,.0f} requests/s; {totals}")


if __name__ == "__main__":
    main()
