#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: the figure that the noise
of a shared machine does not move.

Each server runs under callgrind. The script warms it up with WARM requests,
zeroes the counters, sends N requests on one keep-alive connection, dumps
the counters and divides: start-up, the warm-up and loading do not count.
A scenario with two shards runs both in one process (`kvstore-api all`), so
a forwarded request counts the work of both nodes.

    bench/instructions.py --node target/release/kvstore-api \
        --ceiling target/release/examples/ceiling [--baseline OLD_NODE]

Prints one table; with --baseline the same scenarios run against that
binary too (an older build of the node) and the ratio column compares.
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

VALUE = json.dumps({"value": "v" * 100})
JSON = {"content-type": "application/json"}


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from free_port import free_port as pick_port  # noqa: E402

# Ports handed out in this run: all different, none in the ephemeral range.
GIVEN = set()


def free_port():
    port = pick_port(GIVEN)
    GIVEN.add(port)
    return port


def wait_ready(port, path, proc, timeout=120, method="GET", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = ""
            if log:
                with open(log, errors="replace") as f:
                    # The server's own lines, not valgrind's (`==pid==`).
                    lines = [l for l in f.read().splitlines() if l.strip() and not l.startswith("==")]
                said = ": " + " | ".join(lines[-5:])
            sys.exit(f"server exited with {proc.returncode} before answering on port {port}{said}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request(method, path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status in (200, 204):
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"no answer on port {port} within {timeout} s")


class Session:
    """One keep-alive connection; every answer must have the expected status."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, method, path, body=None, expect=(200, 204)):
        self.conn.request(method, path, body=body, headers=JSON if body else {})
        r = self.conn.getresponse()
        r.read()
        if r.status not in expect:
            sys.exit(f"{method} {path} answered {r.status}, expected {expect}")


def count(work, name, cmd, ports, entry, request, n, warm, setup=None, ready="/readyz", ready_method="GET"):
    """Instructions per request of `request(i)` sent to `entry` (a port)."""
    out = os.path.join(work, "callgrind." + name.replace(" ", "_"))
    for f in glob.glob(out + "*"):
        os.remove(f)
    # What the server says goes to a file, so that a failed start says why.
    log = out + ".log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"] + cmd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "RUST_LOG": "warn"},
        )
    try:
        for port in ports:
            wait_ready(port, ready, proc, method=ready_method, log=log)
        if setup:
            setup()
        s = Session(entry)
        for i in range(warm):
            s.send(*request(i))
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, **quiet)
        for i in range(n):
            s.send(*request(i))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, **quiet)
        dump = f"{out}.{proc.pid}.1"
        for _ in range(300):
            if os.path.exists(dump):
                with open(dump) as f:
                    summary = [line for line in f if line.startswith("summary:")]
                if summary:
                    return int(summary[0].split()[1]) // n
            time.sleep(0.1)
        sys.exit(f"callgrind wrote no summary for {name}")
    finally:
        proc.kill()
        proc.wait()


def layout(path, bounds):
    """A config with one shard per (start, end) pair on free ports."""
    ports = [free_port() for _ in bounds]
    lines = ["shards:"]
    for i, ((start, end), port) in enumerate(zip(bounds, ports)):
        shard = f'  - {{ id: {i}, addr: "127.0.0.1:{port}"'
        if start:
            shard += f', range_start: "{start}"'
        if end:
            shard += f', range_end: "{end}"'
        lines.append(shard + " }")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ports


def fill(port, prefix, keys):
    s = Session(port)
    for i in range(keys):
        s.send("PUT", f"/kv/{prefix}{i:015d}", VALUE)


def kv_get(keys):
    """GETs of the `keys` keys a scenario fills, in turn."""
    return lambda i: ("GET", f"/kv/a{i % keys:015d}")


def kv_put(i):
    """A PUT of a new key, in order."""
    return ("PUT", f"/kv/b{i:015d}", VALUE)


def node_scenarios(work, node, n, warm):
    """Instructions per request of each node scenario, by name."""
    keys = n + warm
    two = os.path.join(work, "two.yaml")
    p0, p1 = layout(two, [("a", "m"), ("n", "z")])
    both = (p0, p1)
    get = kv_get(keys)
    found = {}
    found["local GET"] = count(
        work, "local GET", [node, "all", two], both, p0, get, n, warm, setup=lambda: fill(p0, "a", keys)
    )
    found["forwarded GET"] = count(
        work, "forwarded GET", [node, "all", two], both, p1, get, n, warm, setup=lambda: fill(p0, "a", keys)
    )
    found["PUT (memory)"] = count(
        work, "PUT", [node, "all", two], both, p0, kv_put, n, warm
    )
    eight = os.path.join(work, "eight.yaml")
    starts = ["", "d", "g", "j", "m", "p", "s", "v"]
    ends = ["c", "f", "i", "l", "o", "r", "u", ""]
    ports = layout(eight, list(zip(starts, ends)))

    def fill_eight():
        for start in starts:
            fill(ports[0], start or "a", 100)

    searches = max(n // 10, 50)
    for name, query in [
        ("search, 8 shards (limit=10)", "/search?prefix=&limit=10"),
        ("search, all 8 shards (800 keys)", "/search?prefix=&limit=1000"),
    ]:
        found[name] = count(
            work,
            name,
            [node, "all", eight],
            ports,
            ports[0],
            lambda i, query=query: ("GET", query),
            searches,
            warm // 10,
            setup=fill_eight,
        )
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node", required=True)
    ap.add_argument("--ceiling", required=True)
    ap.add_argument("--baseline", help="an older kvstore-api to compare with")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=300)
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt-get install valgrind)")

    with tempfile.TemporaryDirectory() as work:
        # The ceiling answers any path: besides its constant, it takes the
        # very GETs and PUTs of the node scenarios (routing a longer path
        # costs it too).
        ceilings = {}
        for name, request, mode in [
            ("constant", lambda i: ("GET", "/"), []),
            ("GETs", kv_get(args.requests + args.warm), []),
            ("PUTs", kv_put, ["put"]),
        ]:
            port = free_port()
            ceilings[name] = count(
                work,
                f"ceiling {name}",
                [args.ceiling, f"127.0.0.1:{port}"] + mode,
                (port,),
                port,
                request,
                args.requests,
                args.warm,
                ready="/",
                ready_method="PUT" if mode else "GET",
            )
        now = node_scenarios(work, args.node, args.requests, args.warm)
        before = node_scenarios(work, args.baseline, args.requests, args.warm) if args.baseline else {}

    ceiling = ceilings["constant"]
    targets = {
        "local GET": ("of ceiling", lambda v: v / ceiling, "<= 1.30x", "GETs"),
        "forwarded GET": ("of 93,000", lambda v: v / 93000, "< 1.00x", None),
        "PUT (memory)": ("of ceiling", lambda v: v / ceiling, "", "PUTs"),
        "search, 8 shards (limit=10)": ("", None, "", None),
        "search, all 8 shards (800 keys)": ("", None, "", None),
    }
    print(f"\nInstructions per request (callgrind, {args.requests} keep-alive requests after {args.warm} warm-up)\n")
    head = f"{'scenario':34s} {'now':>10s}"
    if before:
        head += f" {'baseline':>10s} {'now/base':>9s}"
    print(head + "   ratio")
    print(f"{'HTTP ceiling (bare axum, constant)':34s} {ceiling:10d}")
    print(f"{'  ceiling, the same GETs':34s} {ceilings['GETs']:10d}")
    print(f"{'  ceiling, the same PUTs':34s} {ceilings['PUTs']:10d}")
    for name, value in now.items():
        line = f"{name:34s} {value:10d}"
        if before:
            line += f" {before[name]:10d} {value / before[name]:8.2f}x"
        what, ratio, target, same = targets[name]
        if ratio:
            r = ratio(value)
            verdict = ""
            if target:
                bound = float(target.split()[-1].rstrip("x"))
                met = r <= bound if target.startswith("<=") else r < bound
                verdict = f" (target {target}: {'met' if met else 'MISSED'})"
            line += f"   {r:.2f}x {what}{verdict}"
            if same:
                line += f"; {value / ceilings[same]:.2f}x of the same {same}"
        print(line)


if __name__ == "__main__":
    main()
