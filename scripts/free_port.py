#!/usr/bin/env python3
"""A port for a server that a script starts, chosen outside the kernel's
ephemeral range.

A port that `bind(("127.0.0.1", 0))` hands out comes from the ephemeral
range, the same range the kernel picks the local port of every outgoing
connection from. Between the moment a script picks it and the moment its
server binds it, any connection on the machine can take it as its local
port: a benchmark starting eight shards in one process, the first ones
already connecting to their peers, had its fifth shard fail with "Address
already in use". Outside that range only a listener can hold a port, and
this checks that none does.

    python3 scripts/free_port.py [TAKEN_FILE]

prints one port. With TAKEN_FILE, it also skips the ports listed in it and
appends the one it prints, so that the ports a script asks for one at a
time, before starting any server, are all different.
"""

import random
import socket
import sys

# The lowest port handed out; below it are the well-known and often
# configured ones.
LOWEST = 10000


def ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(taken=()):
    """A port outside the ephemeral range, not in `taken`, that nothing
    listens on or is bound to now."""
    low, high = ephemeral_range()
    below = range(LOWEST, low)
    above = range(high + 1, 65536)
    choices = below if len(below) >= len(above) else above
    if not choices:
        sys.exit("the ephemeral port range leaves no port for servers")
    for _ in range(1000):
        port = random.choice(choices)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    sys.exit(f"no free port found in {choices.start}-{choices.stop - 1}")


def main():
    if len(sys.argv) > 1:
        path = sys.argv[1]
        try:
            with open(path) as f:
                taken = {int(line) for line in f if line.strip()}
        except FileNotFoundError:
            taken = set()
        port = free_port(taken)
        with open(path, "a") as f:
            f.write(f"{port}\n")
    else:
        port = free_port()
    print(port)


if __name__ == "__main__":
    main()
