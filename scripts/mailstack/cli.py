"""The `mailstack` command: checks before a run, the lab, and the tests operators run after one."""

from __future__ import annotations

import json
import os
import socket
import sys

import click

from mailstack.inventory import Inventory, InventoryError, Undefined

INVENTORY_HELP = "Inventory directory or file (as for ansible-playbook -i)."


def load(inventory: str, vault_password_file: str | None = None) -> Inventory:
    try:
        return Inventory(inventory, vault_password_file)
    except InventoryError as exc:
        raise click.ClickException(str(exc)) from None


def envelope(inv: Inventory, sender: str | None, recipient: str | None) -> tuple[str, str]:
    """The test messages' sender and recipient: the options, else the inventory's smoke settings."""
    first = inv.hosts()[0]
    try:
        sender = sender or inv.value(first, "mailstack_smoke_sender", None)
        recipient = recipient or inv.value(first, "mailstack_smoke_recipient", None)
    except Undefined as exc:
        raise click.ClickException(str(exc)) from None
    if not sender or not recipient:
        raise click.ClickException("no sender or recipient: pass --sender/--recipient or set "
                                   "mailstack_smoke_sender/mailstack_smoke_recipient in the inventory")
    return sender, recipient


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """mailstack: check an inventory, run the lab, test the mail tier.

    \b
    Examples:
      mailstack check -i inventories/production
      mailstack weights -i inventories/staging
      mailstack lab up && mailstack smoke -i inventories/lab
    """


# ---------------------------------------------------------------- check

@main.command("check")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--vault-password-file", type=click.Path(exists=True, dir_okay=False),
              help="To read an inventory whose vault is encrypted.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check_cmd(inventory: str, vault_password_file: str | None, as_json: bool) -> None:
    """Validate an inventory before any playbook runs on it, contacting no host.

    Runs the checks that playbooks/check.yml (and so site.yml and every tier playbook) runs first
    on real hosts, the same rules: each role's argument types and its own checks on every host
    that gets it, and the inventory as a whole (groups, addresses used twice, misspelt variables,
    the relays' trust in the balancers and the PROXY ports both sides use, VIPs and router ids,
    cluster sizes, certificates). Every finding names the host, the variable, the file:line that
    sets it and what to write instead. Single points of failure and self-signed certificates
    outside the lab are warnings; role variables left to a fact of the host are notes (checked
    with a stand-in).

    Exit code: 1 on errors, 0 when there are only warnings.

    \b
    Example:
      mailstack check -i inventories/production --vault-password-file ~/.vault-pass
    """
    from mailstack.checks import CheckError, check, format_report

    try:
        report = check(load(inventory, vault_password_file), vault_password_file)
    except CheckError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json({"inventory": inventory, "errors": len(report.errors), "warnings": len(report.warnings),
                   "notes": len(report.notes), "findings": [f.as_dict() for f in report.findings]})
    else:
        for line in format_report(report, inventory):
            click.echo(line)
    sys.exit(1 if report.errors else 0)


# ---------------------------------------------------------------- weights

def weights_table(inv: Inventory) -> list[dict]:
    balancers = inv.hosts("balancers")
    if not balancers:
        raise click.ClickException("the inventory has no balancers group: there are no backends")
    lb = balancers[0]
    try:
        group = inv.setting(lb, "haproxy", "haproxy_backend_group")
        weight_var = inv.setting(lb, "haproxy", "haproxy_weight_variable")
        frontends = inv.setting(lb, "haproxy", "haproxy_frontends") or []
        balance = inv.setting(lb, "haproxy", "haproxy_balance")
    except Undefined as exc:
        raise click.ClickException(f"{lb}: {exc.name} {exc}; run `mailstack check`") from None
    relays = []
    for host in inv.hosts(group):
        try:
            weight = inv.value(host, weight_var, 1)
        except Undefined as exc:
            raise click.ClickException(f"{host}: {weight_var} {exc}") from None
        if isinstance(weight, bool) or not isinstance(weight, int):
            # No share can be worked out; what HAProxy accepts is the haproxy role's rule (mailstack check).
            raise click.ClickException(f"{host}: {weight_var} is {weight!r}, not a number: run "
                                       "`mailstack check` for what to write")
        groups = inv.groups_of(host)
        relays.append({"host": host, "mta": "exim" if "exim_relays" in groups else "postfix",
                       "address": inv.address(host), "weight": weight,
                       "weight_set": inv.defines(host, weight_var)})
    total = sum(r["weight"] for r in relays)
    for r in relays:
        r["share_percent"] = round(100.0 * r["weight"] / total, 1) if total else 0.0
    backends = []
    for fe in frontends:
        backends.append({"backend": f"be_{fe['name']}", "frontend_port": fe["port"],
                         "relay_port": fe.get("proxy_backend_port") or fe.get("backend_port"),
                         "balance": balance,
                         "relays": relays})
    return backends


@main.command("weights")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def weights_cmd(inventory: str, as_json: bool) -> None:
    """The relays behind each HAProxy backend, their weights and their share of new sessions.

    A relay's share is its weight over the sum of the weights: of new sessions with roundrobin,
    of concurrent sessions with leastconn; weight 0 means drained.

    \b
    Example:
      mailstack weights -i inventories/lab
    """
    backends = weights_table(load(inventory))
    if as_json:
        emit_json({"inventory": inventory, "backends": backends})
        return
    for be in backends:
        click.echo(f"backend {be['backend']} (port {be['frontend_port']} -> relays' {be['relay_port']}, "
                   f"{be['balance']})")
        click.echo(f"  {'relay':<14}{'mta':<9}{'address':<17}{'weight':>7}{'share':>9}")
        for r in be["relays"]:
            weight = f"{r['weight']}" + ("" if r["weight_set"] else "*")
            share = "drained" if r["weight"] == 0 else f"{r['share_percent']:.1f} %"
            click.echo(f"  {r['host']:<14}{r['mta']:<9}{r['address'] or '?':<17}{weight:>7}{share:>9}")
    if any(not r["weight_set"] for be in backends for r in be["relays"]):
        click.echo("  * not set in the inventory: HAProxy's default weight 1")


# ---------------------------------------------------------------- smoke

@main.command("smoke")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--sender", help="Envelope sender [inventory: mailstack_smoke_sender].")
@click.option("--recipient", help="Recipient [inventory: mailstack_smoke_recipient].")
@click.option("--vip", "vips", multiple=True, help="Only this VIP (repeatable) [all VIPs of the balancers].")
@click.option("--port", type=int, help="SMTP port of the VIPs [the balancers' smtp frontend].")
@click.option("--starttls", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="auto: use STARTTLS when offered.")
@click.option("--verify-tls", is_flag=True, help="Verify the relays' certificates.")
@click.option("--user", help="Authenticate (after STARTTLS) as this user.")
@click.option("--password-env", default="MAILSTACK_SMOKE_PASSWORD", show_default=True,
              help="Environment variable that holds --user's password.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for delivery at a lab sink.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def smoke_cmd(inventory: str, sender: str | None, recipient: str | None, vips: tuple[str, ...],
              port: int | None, starttls: str, verify_tls: bool, user: str | None, password_env: str,
              timeout: float, as_json: bool) -> None:
    """Send one test message through each VIP from this machine and report whether it was accepted.

    This machine must be allowed to relay (in the relay networks), or pass --user with the
    password in $MAILSTACK_SMOKE_PASSWORD. When the inventory has a `sinks` group in containers (the
    lab), the command also waits until each accepted message is found at the sink.

    Exit code: 1 if any VIP did not accept (or, in the lab, did not deliver) its message.

    \b
    Example:
      mailstack smoke -i inventories/lab
      MAILSTACK_SMOKE_PASSWORD=... mailstack smoke -i inventories/staging --user smoke --starttls always
    """
    from mailstack.smoke import lab_sinks, send_one, smtp_port, vip_addresses, wait_delivered

    inv = load(inventory)
    sender, recipient = envelope(inv, sender, recipient)
    targets = list(vips) or vip_addresses(inv)
    if not targets:
        raise click.ClickException("the inventory has no VIPs and no balancers to send through")
    port = port or smtp_port(inv)
    password = os.environ.get(password_env) if user else None
    if user and password is None:
        raise click.ClickException(f"--user given but ${password_env} is not set")
    results = [send_one(vip, port, sender, recipient, helo=socket.getfqdn(), starttls=starttls,
                        user=user, password=password, verify=verify_tls) for vip in targets]
    sinks = lab_sinks(inv)
    if sinks:
        wait_delivered(sinks, results, timeout)
    ok = all(r.accepted and r.delivered is not False for r in results)
    if as_json:
        emit_json({"inventory": inventory, "ok": ok, "sender": sender, "recipient": recipient,
                   "results": [r.as_dict() for r in results]})
    else:
        for r in results:
            state = "accepted" if r.accepted else "NOT accepted"
            line = f"{r.vip}:{r.port} {state} ({r.code} {r.reply.strip()[:80]}) in {r.seconds:.2f}s"
            line += ", TLS" if r.tls else ", no TLS"
            if r.delivered is True:
                line += f"; found at the sink after {r.delivered_after:.1f}s"
            elif r.delivered is False:
                line += f"; NOT found at the sink within {timeout:.0f}s"
            click.echo(line)
            if r.banner:
                click.echo(f"  answered by: {r.banner.strip()[:100]}")
    sys.exit(0 if ok else 1)


# ---------------------------------------------------------------- drill

@main.command("status")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--prometheus", help="Prometheus's URL [the first monitoring host, monitoring_prometheus_port].")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def status_cmd(inventory: str, prometheus: str | None, as_json: bool) -> None:
    """The state of every tier from Prometheus: targets that do not answer, alerts firing, each
    relay's queue and last hour of deliveries, each VIP's holder. Exit 1 when something is wrong.

    Example:
      mailstack status -i inventories/staging --json
    """
    from mailstack.status import Prometheus, StatusError, prometheus_url, render, status

    try:
        url = prometheus or prometheus_url(load(inventory))
        state = status(Prometheus(url))
    except StatusError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(state)
    else:
        click.echo(render(state))
    sys.exit(0 if state["healthy"] else 1)


@main.group("drill")
def drill_group() -> None:
    """Drills that prove the tier survives what it is built to survive.

    \b
    Example:
      mailstack drill failover -i inventories/lab --mode both --rounds 3
    """


@drill_group.command("failover")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--vip", help="The VIP to drill [the first VIP of the balancers].")
@click.option("--mode", type=click.Choice(["haproxy", "keepalived", "both", "container"]), default="both",
              show_default=True, help="What to kill on the balancer holding the VIP: SIGKILL haproxy, "
              "keepalived or both, or stop its whole container (lab only).")
@click.option("--rounds", default=3, show_default=True, help="How many times to kill and restore.")
@click.option("--interval", default=0.1, show_default=True, help="Seconds between test messages.")
@click.option("--settle", default=2.0, show_default=True, help="Seconds of steady traffic around each step.")
@click.option("--port", type=int, help="SMTP port of the VIP [the balancers' smtp frontend].")
@click.option("--sender", help="Envelope sender [inventory: mailstack_smoke_sender].")
@click.option("--recipient", help="Recipient [inventory: mailstack_smoke_recipient].")
@click.option("--json", "as_json", is_flag=True, help="Print the rounds and counts as JSON.")
def drill_failover_cmd(inventory: str, vip: str | None, mode: str, rounds: int, interval: float, settle: float,
                       port: int | None, sender: str | None, recipient: str | None, as_json: bool) -> None:
    """Kill the balancer that holds a VIP, measure until the VIP answers SMTP again from the other
    balancer, restore it, and repeat; mail is sent through the VIP all along.

    Prints each round (when the other balancer had the VIP, the longest time without an SMTP
    answer, the gap when the VIP moved back), the median and worst gap, and the mail counts: sent,
    accepted, refused (clients retry those), and in the lab delivered, lost and duplicated.
    This machine must be allowed to relay. Exit code 1 if any accepted message was lost.

    \b
    Example:
      mailstack drill failover -i inventories/lab --mode container --rounds 5
    """
    from mailstack.drill import DrillError, drill
    from mailstack.smoke import smtp_port

    inv = load(inventory)
    sender, recipient = envelope(inv, sender, recipient)
    log = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    try:
        report = drill(inv, vip, mode, rounds, port or smtp_port(inv), sender, recipient, interval, settle, log)
    except DrillError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(report)
    else:
        click.echo(f"VIP {report['vip']}, {mode}, {len(report['rounds'])} round(s): time without an SMTP answer "
                   f"median {report['gap_median']}s, worst {report['gap_worst']}s")
        line = f"mail: sent {report['sent']}, accepted {report['accepted']}, refused {report['refused']}"
        if report["delivery_checked"]:
            line += (f", delivered {report['delivered']}, lost {report['lost']}, "
                     f"duplicated {report['duplicated']}")
        else:
            line += " (delivery not checked: the inventory has no lab sink)"
        click.echo(line)
    sys.exit(1 if report["lost"] else 0)


# ---------------------------------------------------------------- bench

@main.command("bench")
@click.option("-i", "--inventory", required=True, help=INVENTORY_HELP)
@click.option("--client", default="app1", show_default=True,
              help="Inventory host that runs smtp-source; it must be inside the relay networks.")
@click.option("--relay", help="The relay of the direct runs [the first of mail_relays].")
@click.option("--vip", help="The VIP of the runs through the balancers [the first VIP].")
@click.option("--pool", multiple=True, help="Only these relays behind the VIP (repeatable); the others are "
              "drained on every balancer during the bench and put back after [all relays].")
@click.option("--against", type=click.Choice(["vip", "stock"]), default="vip", show_default=True,
              help="What the direct runs are compared with: the VIP (through the balancers), or a stock Debian "
              "Postfix made for the bench beside the relay (lab only; --relay must be a Postfix relay).")
@click.option("--rounds", default=5, show_default=True, help="Rounds; each sends direct and to --against, "
              "in alternating order.")
@click.option("--count", default=5000, show_default=True, help="Messages per run.")
@click.option("--sessions", default=20, show_default=True, help="Parallel SMTP sessions.")
@click.option("--size", default=5000, show_default=True, help="Message size in bytes.")
@click.option("--sender", default="bench@app.lab.test", show_default=True, help="Envelope sender.")
@click.option("--recipient", default="bench@example.net", show_default=True, help="Recipient.")
@click.option("--json", "as_json", is_flag=True, help="Print every run and the summary as JSON.")
def bench_cmd(inventory: str, client: str, relay: str | None, vip: str | None, pool: tuple[str, ...], against: str,
              rounds: int, count: int, sessions: int, size: int, sender: str, recipient: str, as_json: bool) -> None:
    """Throughput with Postfix's smtp-source: the same load (a) straight to one relay and (b) through a
    VIP to all relays, interleaved over several rounds; prints messages per second for each, their
    ratio, and the share of the sessions each relay got through the VIP.

    A run is timed from smtp-source's start until the relay (or the balancer) accepted every
    message; queues are emptied between runs. In the lab the recording sink is swapped for
    Postfix's smtp-sink during the bench so the relays' onward delivery keeps up. Everything runs
    on one machine: the load generator, balancers, relays and sink share its CPUs, which limits
    the figures; compare the ratio, not the rates, across machines. Against staging, every message
    is delivered onward to wherever the relays send.

    \b
    Example:
      mailstack bench -i inventories/lab --rounds 5 --count 5000 --sessions 20 --size 5000
      mailstack bench -i inventories/lab --pool relay1 --pool relay2     # the Postfix relays only
      mailstack bench -i inventories/lab --against stock                 # the role's Postfix vs Debian's
    """
    from mailstack.bench import BenchError, bench
    from mailstack.stockrelay import StockRelayError

    log = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    try:
        report = bench(load(inventory), client, relay, vip, rounds, count, sessions, size, sender, recipient, log,
                       list(pool), against)
    except (BenchError, StockRelayError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(report)
        return
    if against == "vip":
        click.echo(f"pool behind the VIP: {', '.join(report['pool'])}")
        click.echo(f"direct to {report['relay']}: median {report['direct_median']} msg/s; through VIP {report['vip']}: "
                   f"median {report['vip_median']} msg/s; ratio {report['ratio_of_medians']} "
                   f"(median of per-round ratios {report['ratio_median_per_round']})")
        click.echo("share of the sessions through the VIP: "
                   + ", ".join(f"{r} {p} %" for r, p in report["vip_share_percent"].items()))
    else:
        ratio = 1 / report["ratio_of_medians"] if report["ratio_of_medians"] else 0
        click.echo(f"the role's Postfix ({report['relay']}): median {report['direct_median']} msg/s; stock Debian "
                   f"Postfix: median {report['stock_median']} msg/s; role / stock {ratio:.3f}")
    click.echo(f"VRRP transitions during the bench ({report['seconds']} s): "
               + ", ".join(f"{lb} {n}" for lb, n in report["vrrp_transitions"].items()))
    for target in ("direct", against):
        cpu = report["cpu"][target]
        if cpu:
            busy = (f"; the machine's {report['cpus']} CPUs {cpu['machine_busy_percent']} % busy"
                    if report["all_hosts_on_this_machine"] else "")
            click.echo(f"CPU per message {target}: {cpu['cpu_ms_per_message_total']} ms ("
                       + ", ".join(f"{k} {v}" for k, v in cpu["cpu_ms_per_message"].items()) + f"){busy}")
    if report["all_hosts_on_this_machine"]:
        click.echo(f"({report['cpus']} CPUs shared by the load generator, balancers, relays and sink)")


# ---------------------------------------------------------------- lab

@main.group("lab")
def lab_group() -> None:
    """The whole stack in containers on this machine, from inventories/lab.

    \b
    Examples:
      mailstack lab up                 # or: make lab
      mailstack lab status --json
      mailstack lab down
    """


@lab_group.command("up")
@click.option("--distro", default=lambda: os.environ.get("LAB_DISTRO", "debian12"),
              show_default="$LAB_DISTRO or debian12", help="Debian release of the containers.")
@click.option("--recreate", is_flag=True, help="Remove the running lab first and build it anew.")
@click.option("--json", "as_json", is_flag=True, help="End with the lab's status as JSON instead of text.")
def lab_up_cmd(distro: str, recreate: bool, as_json: bool) -> None:
    """Create the lab's containers (or keep the running ones) and converge them with site.yml.

    A second run keeps the containers and only converges them. Progress goes to stderr; the
    playbook's full output to .cache/logs/lab-site.log.

    \b
    Example:
      mailstack lab up --distro debian13 --recreate
    """
    from mailstack import lab

    state = lab.up(distro, recreate)
    if as_json:
        emit_json(state)
    else:
        from mailstack.labstatus import format_welcome

        for line in format_welcome(state, lab.Lab.load()):
            click.echo(line)
    sys.exit(0 if state["healthy"] else 1)


@lab_group.command("down")
def lab_down_cmd() -> None:
    """Remove the lab's containers and its network.

    \b
    Example:
      mailstack lab down
    """
    from mailstack import lab

    removed = lab.down()
    click.echo(f"lab: removed {len(removed)} container(s)" + (f": {', '.join(removed)}" if removed else ""))


@lab_group.command("status")
@click.option("--json", "as_json", is_flag=True,
              help="Print every host's name, address, groups and state, the VIPs and the backends as JSON.")
def lab_status_cmd(as_json: bool) -> None:
    """Per host whether it runs; which balancer holds each VIP; each backend's state and weight as
    HAProxy sees them; each relay's queue; Redis and RabbitMQ health.

    Exit code: 1 when anything is unhealthy (a container stopped, a VIP held by no balancer or by
    two, a relay not UP, Redis or RabbitMQ not answering).

    \b
    Example:
      mailstack lab status --json | jq '.vips'
    """
    from mailstack import labstatus

    state = labstatus.status()
    if as_json:
        emit_json(state)
    else:
        for line in labstatus.format_status(state):
            click.echo(line)
    sys.exit(0 if state["healthy"] else 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
