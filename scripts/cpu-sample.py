#!/usr/bin/env python3
"""CPU time per process of the stack, from /proc (for scripts/cpu-per-command.sh).

  cpu-sample.py BIN_DIR        one sample, as JSON: {"at": seconds, "cpu": {name: seconds}}
  cpu-sample.py --report IDLE_FROM IDLE_TO LOAD_FROM LOAD_TO LOAD_JSON
                               the table: each process's share of a core idle and under
                               load, and its CPU ms per command of the load's level

A process is named by its binary when it is one of BIN_DIR's (the functions,
tally-bench), else moto, tansu, redis or postgres; the rest of the machine is left out.
"""
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def name_of(pid, bin_dir):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    exe = argv[0]
    if os.path.dirname(os.path.abspath(exe)) == os.path.abspath(bin_dir):
        return os.path.basename(exe)
    line = " ".join(argv)
    if "moto" in line:
        return "moto"
    if os.path.basename(exe) == "tansu":
        return "tansu"
    if "redis-server" in line:
        return "redis"
    if line.startswith("postgres") or "/postgres" in exe:
        return "postgres"
    return None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are the 14th and 15th fields; the split starts at the 3rd.
    return (int(fields[11]) + int(fields[12])) / TICK


def sample(bin_dir):
    cpu = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        name = name_of(pid, bin_dir)
        if name is None:
            continue
        try:
            cpu[f"{name}\0{pid}"] = cpu_seconds(pid)
        except OSError:
            continue
    return {"at": time.time(), "cpu": cpu}


def per_name(before, after):
    """CPU seconds per process name between two samples (processes that started
    between them count from zero)."""
    used = {}
    for key, seconds in after["cpu"].items():
        name = key.split("\0")[0]
        used[name] = used.get(name, 0.0) + seconds - before["cpu"].get(key, 0.0)
    return used


def report(idle_from, idle_to, load_from, load_to, load_json):
    idle_from, idle_to, load_from, load_to = (
        json.loads(s) for s in (idle_from, idle_to, load_from, load_to))
    with open(load_json) as f:
        run = json.load(f)
    level = run["levels"][-1]
    commands = sum(level["ops"][op]["count"] for op in ("deposit", "withdraw") if op in level["ops"])
    queries = sum(level["ops"][op]["count"] for op in ("balance", "history") if op in level["ops"])
    seconds = level["seconds"]
    idle = per_name(idle_from, idle_to)
    load = per_name(load_from, load_to)
    window = load_to["at"] - load_from["at"]
    idle_window = idle_to["at"] - idle_from["at"]
    print(f"c={level['concurrency']}: {commands} commands ({commands / seconds:.1f}/s) and "
          f"{queries} queries in {seconds:.1f} s; CPU over {window:.1f} s; idle over {idle_window:.1f} s")
    print()
    print("| process | idle, % of a core | under load, % of a core | CPU ms per command |")
    print("| --- | ---: | ---: | ---: |")
    total_idle = total_load = 0.0
    for name in sorted(load, key=lambda n: -load[n]):
        total_idle += idle.get(name, 0.0)
        total_load += load[name]
        print(f"| {name} | {100 * idle.get(name, 0.0) / idle_window:.1f} | "
              f"{100 * load[name] / window:.1f} | {1000 * load[name] / commands:.2f} |")
    print(f"| **all** | {100 * total_idle / idle_window:.1f} | {100 * total_load / window:.1f} | "
          f"{1000 * total_load / commands:.2f} |")
    outside = total_load - load.get("moto", 0.0)
    print()
    print(f"outside moto: {1000 * outside / commands:.2f} ms of CPU per command")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(*sys.argv[2:7])
    else:
        print(json.dumps(sample(sys.argv[1])))
