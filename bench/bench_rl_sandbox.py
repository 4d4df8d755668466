"""Cost of one sandboxed code-execution reward (m1model.rl.sandbox) against a bare interpreter start.

A reward call runs a candidate `add(a, b)` on 8 test cases. The layers are
switched on one by one and compared, in the same run, with the floor: starting
the same interpreter with `python -I -S -c pass` and waiting for it. The
ratios say what the sandbox adds to the unavoidable process start; the
absolute times say how many rewards per second one core can score.

    python bench/bench_rl_sandbox.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

from common import print_table, time_ms, write_json

from m1model.rl import sandbox
from m1model.rl.sandbox import SandboxLimits, run_function_tests

CODE = "def add(a, b):\n    return a + b\n"
CASES = [((i, 2 * i), 3 * i) for i in range(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    uid = sandbox._target_user(SandboxLimits())
    python = sandbox._interpreter(uid, None)
    netns = bool(sandbox._netns_prefix(uid, python))
    calls = {"python -I -S -c pass": lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)}
    for name, limits in {
        "all layers": SandboxLimits(),
        "no network namespace": SandboxLimits(network_namespace=False),
        "no namespace, no hook": SandboxLimits(network_namespace=False, audit_hook=False),
    }.items():
        result = run_function_tests(CODE, "add", CASES, limits)
        assert result.score == 1.0, result
        calls[name] = lambda limits=limits: run_function_tests(CODE, "add", CASES, limits)
    # Round-robin over the configurations, so that load from other processes
    # drifting during the run hits all of them alike; medians per configuration.
    times = {name: [] for name in calls}
    for _ in range(args.repeat):
        for name, fn in calls.items():
            times[name].append(time_ms(fn, repeat=1, warmup=0))
    floor = statistics.median(times["python -I -S -c pass"])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append({"config": name, "ms": ms, "ratio": ms / floor, "per_s": 1e3 / ms})
    print(f"sandbox uid: {uid}, network namespace available: {netns}, interpreter: {python}")
    print_table(rows, [("config", "configuration", "<24"), ("ms", "ms/call", ">8.1f"),
                       ("ratio", "x floor", ">8.2f"), ("per_s", "calls/s", ">8.1f")])
    write_json("rl_sandbox", {"uid": uid, "network_namespace": netns, "cases": len(CASES), "rows": rows})


if __name__ == "__main__":
    main()
