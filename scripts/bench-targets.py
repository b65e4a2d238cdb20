#!/usr/bin/env python3
"""Issue 16's targets, each beside the figure one `make bench` run measured.

scripts/bench.sh runs this at the end of a run over the files that run wrote and keeps
the table as results/<time>-targets.md; by hand:

    scripts/bench-targets.py --stack results/…-stack.json --dev-pg results/…-dev-pg.json \\
        --rebuild-stack results/…-rebuild-stack.json --rebuild-dev results/…-rebuild-dev.json \\
        --micro results/…-micro.txt

A part the run left out (BENCH_ONLY) is reported as not measured. Timings are never
judged by the tests (these machines are noisy): this only reads what a run measured.
"""

import argparse
import json
import re
import sys


def load(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def level(report, concurrency):
    for lv in report.get("levels", []):
        if lv["concurrency"] == concurrency:
            return lv
    return None


def commands(lv, successful=False):
    """The level's deposits and withdrawals per second, as tally-bench counted them: all
    sent, or only those answered (2xx, or 422 for a refused withdrawal)."""
    return lv["successful_commands_per_second" if successful else "commands_per_second"]


def ceiling_put(report, concurrency):
    for lv in (report.get("ceiling") or {}).get("levels", []):
        if lv["concurrency"] == concurrency and lv.get("s3_conditional_put"):
            return lv["s3_conditional_put"]["per_second"]
    return None


def micro_median_ms(text, name):
    """The middle estimate of criterion's `time: [low mid high]` for benchmark `name`, in ms."""
    m = re.search(
        r"^" + re.escape(name) + r"\n\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", text, re.M
    )
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]


def verdict(ok):
    return "met" if ok else "**not met**"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack")
    p.add_argument("--dev-pg")
    p.add_argument("--rebuild-stack")
    p.add_argument("--rebuild-dev")
    p.add_argument("--micro")
    a = p.parse_args()

    stack, dev_pg = load(a.stack), load(a.dev_pg)
    rebuild_stack, rebuild_dev = load(a.rebuild_stack), load(a.rebuild_dev)
    micro = None
    if a.micro:
        try:
            with open(a.micro, encoding="utf-8") as f:
                micro = f.read()
        except OSError:
            pass

    rows = []
    absent = "not measured in this run"
    for c in (16, 64):
        lv = level(stack, c) if stack else None
        put = ceiling_put(stack, c) if stack else None
        if lv and put:
            sent = commands(lv)
            share = sent / put
            rows.append((
                f"S3 stack commands/s at c={c}, beside moto's bare conditional-PUT rate in the same run",
                f"{sent:.0f} of {put:.0f} = {100 * share:.0f} %",
                "≥ 80 %",
                verdict(share >= 0.8),
            ))
        else:
            rows.append((f"S3 stack commands/s at c={c}", absent, "≥ 80 % of the ceiling", "—"))
    lv = level(stack, 64) if stack else None
    s3 = (lv or {}).get("s3_requests")
    if s3:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s3["by_kind"].items()))
        rows.append((
            "S3 requests per command at c=64 (the level's every request, by kind)",
            f"{s3['per_command']:.2f} ({kinds})",
            "≤ 1.25",
            verdict(s3["per_command"] <= 1.25),
        ))
    else:
        rows.append(("S3 requests per command at c=64", absent, "≤ 1.25", "—"))
    for name, r, target in (("S3 (moto)", rebuild_stack, 20_000), ("directory", rebuild_dev, 100_000)):
        if r:
            rows.append((
                f"rebuild from the {name} store, events/s",
                f"{r['events_per_second']:,} ({r['events']:,} events in {r['seconds']:.2f} s)",
                f"≥ {target:,}",
                verdict(r["events_per_second"] >= target),
            ))
        else:
            rows.append((f"rebuild from the {name} store, events/s", absent, f"≥ {target:,}", "—"))
    loaded = micro_median_ms(micro, "load/s3/10k events, snapshot") if micro else None
    if loaded is not None:
        rows.append((
            "a 10k-event stream loaded from S3 (criterion `load/s3/10k events, snapshot`)",
            f"{loaded:.1f} ms",
            "< 20 ms",
            verdict(loaded < 20),
        ))
    else:
        rows.append(("a 10k-event stream loaded from S3", absent, "< 20 ms", "—"))
    lv = level(dev_pg, 64) if dev_pg else None
    if lv:
        ok = commands(lv, successful=True)
        rows.append((
            "gateway alone on the PostgreSQL store: successful commands/s at c=64",
            f"{ok:,.0f}",
            "≥ 4,000",
            verdict(ok >= 4000),
        ))
    else:
        rows.append(("gateway alone on the PostgreSQL store, c=64", absent, "≥ 4,000", "—"))

    commit = next((r.get("commit") for r in (stack, dev_pg, rebuild_stack, rebuild_dev) if r), None)
    print(f"# Issue 16's targets: `make bench` at {commit}\n" if commit else "# Issue 16's targets: nothing measured\n")
    print("| target | this run | wanted | |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
