#!/usr/bin/env python3
"""amqpprobe: a scriptable AMQP client for the test bench; prints one JSON report.

  amqpprobe --host 10.0.0.1 --user u --password p --vhost /mail check
  amqpprobe ... publish --exchange mail.outgoing --routing-key send --count 100 --prefix job [--body TEXT]
  amqpprobe ... consume --queue mail.send --max 100 --idle 5 [--reject]
  amqpprobe ... depth --queue mail.send --queue mail.retry

publish uses publisher confirms and persistent messages: a message is "confirmed" only when the
broker said so. Bodies are "<prefix>-<n>", or --body with {id} replaced by that (a mail job, say).
consume acknowledges (or rejects without requeue)
each message after recording it, and stops after --max messages or --idle seconds of silence.
"""

import argparse
import json
import sys
import time

import pika
from pika.exceptions import AMQPError


def connect(args):
    params = pika.ConnectionParameters(
        host=args.host, port=args.port, virtual_host=args.vhost,
        credentials=pika.PlainCredentials(args.user, args.password),
        connection_attempts=1, socket_timeout=5, blocked_connection_timeout=10, heartbeat=30)
    return pika.BlockingConnection(params)


def check(args):
    try:
        conn = connect(args)
        conn.close()
        return {"connected": True}
    except AMQPError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc!r}"}


def publish(args):
    report = {"confirmed": [], "failed": [], "errors": {}}
    conn = channel = None
    for n in range(args.start, args.start + args.count):
        name = f"{args.prefix}-{n}"
        body = args.body.replace("{id}", name) if args.body else name
        for _attempt in range(args.retries + 1):
            try:
                if channel is None or channel.is_closed:
                    conn = connect(args)
                    channel = conn.channel()
                    channel.confirm_delivery()
                channel.basic_publish(args.exchange, args.routing_key, body.encode(),
                                      pika.BasicProperties(delivery_mode=2, message_id=name),
                                      mandatory=True)
                report["confirmed"].append(name)
                time.sleep(args.interval)
                break
            except (AMQPError, OSError) as exc:
                name = type(exc).__name__
                report["errors"][name] = report["errors"].get(name, 0) + 1
                channel = None
                time.sleep(0.2)
        else:
            report["failed"].append(name)
    if conn and conn.is_open:
        conn.close()
    return report


def consume(args):
    conn = connect(args)
    channel = conn.channel()
    channel.basic_qos(prefetch_count=50)
    got = []
    last = time.monotonic()
    while len(got) < args.max and time.monotonic() - last < args.idle:
        method, props, body = channel.basic_get(args.queue, auto_ack=False)
        if method is None:
            time.sleep(0.1)
            continue
        last = time.monotonic()
        deaths = (props.headers or {}).get("x-death") or []
        got.append({"body": body.decode(), "redelivered": method.redelivered,
                    "reason": (props.headers or {}).get("x-mailstack-reason"),
                    "x_death": [{"queue": d.get("queue"), "reason": d.get("reason"), "count": d.get("count")}
                                for d in deaths]})
        if args.reject:
            channel.basic_reject(method.delivery_tag, requeue=False)
        else:
            channel.basic_ack(method.delivery_tag)
    conn.close()
    return {"messages": got}


def depth(args):
    conn = connect(args)
    channel = conn.channel()
    counts = {q: channel.queue_declare(q, passive=True).method.message_count for q in args.queue}
    conn.close()
    return {"messages": counts}


def declare(args):
    """Declare a durable queue as an application would: no arguments, or x-queue-type when --type."""
    conn = connect(args)
    channel = conn.channel()
    arguments = {"x-queue-type": args.type} if args.type else None
    channel.queue_declare(args.queue, durable=True, arguments=arguments)
    conn.close()
    return {"declared": args.queue}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--vhost", default="/")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    pub = sub.add_parser("publish")
    pub.add_argument("--exchange", required=True)
    pub.add_argument("--routing-key", default="")
    pub.add_argument("--count", type=int, default=1)
    pub.add_argument("--start", type=int, default=1)
    pub.add_argument("--prefix", required=True)
    pub.add_argument("--retries", type=int, default=0)
    pub.add_argument("--interval", type=float, default=0, help="seconds between messages")
    pub.add_argument("--body", default="", help="the body, with {id} for <prefix>-<n>")
    con = sub.add_parser("consume")
    con.add_argument("--queue", required=True)
    con.add_argument("--max", type=int, default=1)
    con.add_argument("--idle", type=float, default=5)
    con.add_argument("--reject", action="store_true")
    dec = sub.add_parser("declare")
    dec.add_argument("--queue", required=True)
    dec.add_argument("--type", choices=["classic", "quorum"])
    dep = sub.add_parser("depth")
    dep.add_argument("--queue", action="append", required=True)
    args = p.parse_args()
    try:
        report = {"check": check, "publish": publish, "consume": consume, "declare": declare,
                  "depth": depth}[args.command](args)
    except (AMQPError, OSError) as exc:
        report = {"error": f"{type(exc).__name__}: {exc!r}"}
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
