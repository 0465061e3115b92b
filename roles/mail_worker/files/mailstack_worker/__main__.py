"""mailstack-worker: run the worker, or check a job or forget a cached template.

  python3 -m mailstack_worker run --config /etc/mailstack-worker/worker.json
  python3 -m mailstack_worker validate JOB.json ...     exit 1 with the reason for each job that fails
  python3 -m mailstack_worker check-template FILE        exit 1 when a template file would not load
  python3 -m mailstack_worker forget-template --config F ID VERSION
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailstack-worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="consume jobs until SIGTERM")
    run.add_argument("--config", required=True)
    validate = sub.add_parser("validate", help="check jobs against the job schema")
    validate.add_argument("files", nargs="+")
    check = sub.add_parser("check-template", help="check one template file (<id>/<version>.json)")
    check.add_argument("file")
    forget = sub.add_parser("forget-template", help="drop a template version from the Redis cache")
    forget.add_argument("--config", required=True)
    forget.add_argument("id")
    forget.add_argument("version")
    args = parser.parse_args(argv)

    if args.command == "validate":
        from .job import InvalidJob, parse

        failed = 0
        for name in args.files:
            try:
                parse(Path(name).read_bytes())
                print(f"{name}: valid")
            except InvalidJob as exc:
                failed += 1
                print(f"{name}: {exc}")
        return 1 if failed else 0

    if args.command == "check-template":
        from .templates import TemplateError, check_file

        try:
            check_file(Path(args.file))
        except TemplateError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0

    from .config import load, redis_client

    config = load(args.config)
    if args.command == "forget-template":
        from .templates import TemplateStore

        TemplateStore(config.templates_directory, redis_client(config.redis)).forget(args.id, args.version)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(threadName)s %(levelname)s %(message)s")
    # pika's INFO is every socket it opens, and a node that refuses a connection is an ERROR with a
    # traceback there; the worker logs each connection problem once, naming the node
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    from .worker import run_forever

    run_forever(config, redis_client(config.redis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
