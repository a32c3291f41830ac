#!/usr/bin/env python3
"""Times shell commands against each other: runs them in turn, RUNS rounds, and prints
each one's median wall time in seconds, one `NAME SECONDS` line each.

    timeit.py RUNS [--before CMD] NAME CMD [NAME CMD ...]

Rounds interleave the commands (a b a b ...) so that a drift in machine speed (another
process, the page cache, frequency) falls on all of them alike; a warm-up round runs
first and is not counted. `--before CMD` runs (untimed) before every timed command, e.g.
to remove the previous run's output. Each command runs under `sh -c`, the same fork and
exec cost for all. A command that fails stops everything with its exit code.
"""
import statistics
import subprocess
import sys
import time


def main(argv):
    runs = int(argv[0])
    rest = argv[1:]
    before = None
    if rest[:1] == ["--before"]:
        before, rest = rest[1], rest[2:]
    if not rest or len(rest) % 2:
        sys.exit("usage: timeit.py RUNS [--before CMD] NAME CMD [NAME CMD ...]")
    cmds = list(zip(rest[0::2], rest[1::2]))
    times = {name: [] for name, _ in cmds}
    for round_ in range(runs + 1):
        for name, cmd in cmds:
            if before:
                subprocess.run(["sh", "-c", before], check=True)
            start = time.perf_counter()
            done = subprocess.run(["sh", "-c", cmd], stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name}: `{cmd}` exited with {done.returncode}")
            if round_ > 0:
                times[name].append(elapsed)
    for name, _ in cmds:
        print(name, "%.4f" % statistics.median(times[name]))


if __name__ == "__main__":
    main(sys.argv[1:])
