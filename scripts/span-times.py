#!/usr/bin/env python3
"""Where a command's time goes, from the functions' span logs.

With TALLY_LOG_SPANS=1 every enabled span logs a `close` event with `time.busy` and
`time.idle` (see tally-runtime's `init_tracing`). This prints, per span name, how many
closed and their wall time (busy + idle) and CPU-side busy time, over the last WINDOW
seconds of each log (the load's level, not the warm-up before it):

    STACK_RUST_LOG=warn,tally_app=debug,aws_sdk_s3=debug TALLY_LOG_SPANS=1 \\
        IDLE=2 scripts/cpu-per-command.sh
    scripts/span-times.py 9 .stack/cpu-logs/deposit.log .stack/cpu-logs/withdraw.log
"""
import collections
import datetime
import json
import re
import sys

UNITS = {"ns": 1e-6, "µs": 1e-3, "ms": 1.0, "s": 1000.0}


def millis(value):
    m = re.fullmatch(r"([\d.]+)(ns|µs|ms|s)", value)
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def seconds(stamp):
    # RFC 3339 with up to nanoseconds; Python parses microseconds.
    head, _, frac = stamp.rstrip("Z").partition(".")
    at = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc)
    return at.timestamp() + float("0." + (frac or "0"))


def closes(path):
    with open(path, errors="replace") as f:
        for line in f:
            if '"message":"close"' not in line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    window, spans = float(sys.argv[1]), collections.defaultdict(list)
    for path in sys.argv[2:]:
        events = list(closes(path))
        if not events:
            print(f"{path}: no closed spans (TALLY_LOG_SPANS=1?)", file=sys.stderr)
            continue
        end = seconds(events[-1]["timestamp"])
        for e in events:
            if seconds(e["timestamp"]) >= end - window:
                busy, idle = millis(e["time.busy"]), millis(e["time.idle"])
                spans[e.get("span", {}).get("name", "?")].append((busy + idle, busy))
    print("| span | closed | wall p50 ms | p90 | mean | busy p50 ms | busy mean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in sorted(spans.items(), key=lambda kv: -len(kv[1])):
        wall, busy = [r[0] for r in rows], [r[1] for r in rows]
        print(f"| {name} | {len(rows)} | {percentile(wall, .5):.2f} | {percentile(wall, .9):.2f} "
              f"| {sum(wall) / len(wall):.2f} | {percentile(busy, .5):.3f} | {sum(busy) / len(busy):.3f} |")


if __name__ == "__main__":
    main()
