#!/usr/bin/env python3
"""Write to Redis through Sentinel for a while, as an application would, and report as JSON.

Every attempt is a SET of a new key on the master Sentinel names (asked again after each error),
followed by WAIT 1: an acknowledged write is one Redis answered OK; a replicated one is one at
least one replica had confirmed. Reported: attempts, acknowledged and replicated key numbers,
errors, and the longest time between two acknowledged writes (the write gap).
"""

import argparse
import json
import sys
import time

from redis.sentinel import Sentinel


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sentinel", action="append", required=True, help="host:port, repeatable")
    p.add_argument("--sentinel-password", required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--interval", type=float, default=0.02)
    args = p.parse_args()

    sentinels = [(h, int(port)) for h, port in (s.rsplit(":", 1) for s in args.sentinel)]
    sentinel = Sentinel(sentinels, socket_timeout=0.5, sentinel_kwargs={"password": args.sentinel_password,
                                                                        "socket_timeout": 0.5})
    master = sentinel.master_for(args.master, socket_timeout=0.5, socket_connect_timeout=0.5,
                                 username=args.user, password=args.password)
    acked, replicated, errors, ok_times = [], [], {}, []
    masters_seen = [sentinel.discover_master(args.master)[0]]
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            master.set(f"{args.prefix}:{n}", n)
            ok_times.append(time.monotonic())
            acked.append(n)
            if master.execute_command("WAIT", 1, 200) >= 1:
                replicated.append(n)
        except Exception as exc:  # noqa: BLE001  every failure is counted, by kind
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        time.sleep(args.interval)
    masters_seen.append(sentinel.discover_master(args.master)[0])
    gaps = [b - a for a, b in zip(ok_times, ok_times[1:])]
    json.dump({"attempts": n, "acked": acked, "replicated": replicated, "errors": errors,
               "max_gap": max(gaps) if gaps else None, "masters_seen": masters_seen}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
