#!/usr/bin/env python3
"""Count the S3 requests one bucket received from moto's access log, by kind.

    scripts/s3-requests.py BUCKET [FROM [TO]]     e.g. bench-20261126163650 16:37:10 16:37:50

FROM/TO are HH:MM:SS (the log's local time). The log is $TALLY_CACHE/run/moto.log
(default ~/.cache/tally/run/moto.log; scripts/services.sh starts moto with it). This is
how bench/README.md counts S3 requests per command: divide by the commands the bench
acknowledged in the same window.
"""
import collections
import os
import re
import sys

if len(sys.argv) < 2:
    sys.exit(__doc__)
bucket = sys.argv[1]
start = sys.argv[2] if len(sys.argv) > 2 else "00:00:00"
end = sys.argv[3] if len(sys.argv) > 3 else "99:99:99"
log = os.path.join(os.environ.get("TALLY_CACHE", os.path.expanduser("~/.cache/tally")), "run", "moto.log")
request = re.compile(r'\[[^\]]* (\d\d:\d\d:\d\d)\] "(\w+) (/[^ ]*) HTTP')
ansi = re.compile(r"\x1b\[[0-9;]*m")
counts = collections.Counter()
for line in open(log, errors="replace"):
    m = request.search(ansi.sub("", line))
    if not m:
        continue
    at, method, path = m.groups()
    if not (start <= at <= end) or not path.startswith("/" + bucket):
        continue
    rest = path[len(bucket) + 1:].lstrip("/")
    if rest == "" or rest.startswith("?"):
        if method == "POST" and "delete" in rest:
            kind = "DeleteObjects"
        else:
            area = re.search(r"prefix=([a-z]+)", rest)
            kind = f"LIST {area.group(1) if area else rest[:30]}"
    else:
        kind = f"{method} {rest.split('/')[0]}"
    counts[kind] += 1
print(f"{bucket} {start}..{end}: {sum(counts.values())} requests")
for kind, n in counts.most_common():
    print(f"  {n:7d}  {kind}")
