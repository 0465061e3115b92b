"""The pieces of the drill and the traffic sender that can be proven without a lab."""

from __future__ import annotations

import time

import pytest
from test_cli import FakeSMTP, fake_smtp  # noqa: F401  (the fixture is used by name)

from mailstack.drill import Watcher
from mailstack.traffic import Sender


def test_longest_gap_counts_from_the_start_and_to_the_end_of_the_window():
    w = Watcher("127.0.0.1", 9)
    w.ok_times = [10.0, 10.1, 10.2, 13.5, 13.6]
    assert w.longest_gap(10.15, 14.0) == pytest.approx(3.3)
    assert w.longest_gap(13.55, 16.0) == pytest.approx(2.4)
    assert w.first_answer_after(10.25) == pytest.approx(3.25)
    assert w.first_answer_after(14.0) is None


def test_sender_records_every_message_accepted_or_refused(fake_smtp):  # noqa: F811
    sender = Sender(["127.0.0.1"], fake_smtp, "a@example.com", "b@example.com", prefix="unit", interval=0.02)
    sender.start()
    time.sleep(0.3)
    sender.stop()
    assert len(sender.results) >= 5 and len(sender.accepted) == len(sender.results)
    ids = [r.test_id for r in sender.results]
    assert ids == [f"unit-{n}" for n in range(len(ids))]
    refused = Sender(["127.0.0.1"], fake_smtp, "a@example.com", "x@refused.test", prefix="no", interval=0.02)
    refused.start()
    time.sleep(0.1)
    refused.stop()
    assert refused.results and not refused.accepted and refused.refused[0].detail.startswith("554")


def test_sender_counts_a_dead_address_as_refused():
    sender = Sender(["127.0.0.1"], 9, "a@example.com", "b@example.com", interval=0.02, timeout=1)
    sender.start()
    time.sleep(0.1)
    sender.stop()
    assert sender.results and not sender.accepted
    assert "ConnectionRefusedError" in sender.refused[0].detail


def test_bench_cpu_profile_gives_milliseconds_per_message_by_kind_of_host(monkeypatch):
    from mailstack import bench

    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    roles = {"app1": "client", "lb1": "balancers", "relay1": "relays", "relay2": "relays", "sink": "sink"}
    runs = [
        bench.Run(1, "vip", "10.0.0.200", 1000, 2.0, {}, {"app1": 0.3, "lb1": 0.8, "relay1": 1.2, "relay2": 1.3,
                                                          "sink": 0.2}),
        bench.Run(2, "vip", "10.0.0.200", 1000, 4.0, {}, {"app1": 0.3, "lb1": 1.0, "relay1": 1.5, "relay2": 1.5,
                                                          "sink": 0.2}),
        bench.Run(1, "direct", "10.0.0.21", 1000, 1.0, {}, {"app1": 0.3, "lb1": 0.0, "relay1": 1.5, "relay2": 0.0,
                                                            "sink": 0.2}),
    ]
    vip = bench.cpu_profile(runs, roles, "vip")
    assert vip["cpu_ms_per_message"] == {"balancers": 0.9, "client": 0.3, "relays": 2.75, "sink": 0.2}
    assert vip["cpu_ms_per_message_total"] == 4.15
    # (3.8 s of CPU in 2 s on 2 CPUs = 95 %, 4.5 s in 4 s = 56.25 %): the median
    assert vip["machine_busy_percent"] == 75.6
    assert bench.cpu_profile(runs, roles, "direct")["cpu_ms_per_message"]["relays"] == 1.5
    assert bench.cpu_profile([], roles, "vip") == {}


def test_a_hung_attempt_does_not_delay_the_next_one():
    """The watcher's resolution is its interval, not its timeout: while the server sends no
    greeting for 0.6 s, attempts hang, yet the gap measured is about 0.6 s, not 0.6 s plus a
    2-second timeout."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    mute_until = [0.0]
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if time.monotonic() >= mute_until[0]:
                conn.sendall(b"220 ok\r\n")
                conn.close()
            else:
                held.append(conn)  # muted: open, no greeting, until the client gives up

    threading.Thread(target=serve, daemon=True).start()
    w = Watcher("127.0.0.1", server.getsockname()[1], every=0.05, timeout=2.0)
    w.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    mute_until[0] = t0 + 0.6
    time.sleep(1.2)
    w.stop()
    server.close()
    gap = w.longest_gap(t0, t0 + 1.2)
    assert 0.55 <= gap <= 0.9, gap


def test_the_stock_relay_writes_mynetworks_as_postfix_wants_it():
    from mailstack.stockrelay import mynetworks

    assert mynetworks(["10.89.60.1/32", "2001:db8::/32"]) == "127.0.0.0/8 [::1]/128 10.89.60.1/32 [2001:db8::]/32"
