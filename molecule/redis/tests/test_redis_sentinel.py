"""A replicated Redis group with Sentinel: one master, two replicas, three Sentinels that agree;
SIGKILL the master's Redis and a replica is promoted while a client that finds the master through
Sentinel keeps writing; a converge after the failover keeps the new master."""

import json
import shlex
import time
from pathlib import Path

import pytest
from benchlib import converge, new_id, wait_until

WRITER = Path(__file__).with_name("sentinel_writer.py")


def admin(node, target, *args, port=None):
    port = port or node.vars["redis_port"]
    auth = node.vars["redis_sentinel_password"] if port == node.vars["redis_sentinel_port"] else \
        node.vars["redis_admin_password"]
    user = "" if port == node.vars["redis_sentinel_port"] else f"--user {node.vars['redis_admin_user']} "
    command = (f"REDISCLI_AUTH={shlex.quote(auth)} timeout 10 redis-cli -h {target.ip} -p {port} {user}"
               f"--no-auth-warning " + " ".join(shlex.quote(str(a)) for a in args))
    return node.run(command, check=False).stdout.strip()


def roles(nodes):
    return {n.name: admin(n, n, "ROLE").splitlines()[0] if admin(n, n, "ROLE") else "down" for n in nodes}


def master_of(nodes):
    masters = [n for n, r in roles(nodes).items() if r == "master"]
    return [n for n in nodes if n.name in masters]


def sentinel_master(nodes, asking):
    out = admin(asking, asking, "SENTINEL", "get-master-addr-by-name", asking.vars["redis_sentinel_master_name"],
                port=asking.vars["redis_sentinel_port"])
    return out.splitlines()[0] if out else ""


def test_one_master_and_two_replicas(nodes):
    masters = master_of(nodes)
    assert len(masters) == 1, roles(nodes)
    info = admin(masters[0], masters[0], "INFO", "replication")
    assert "connected_slaves:2" in info, info


def test_every_sentinel_names_the_same_master_and_knows_the_others(nodes):
    master = master_of(nodes)[0]
    for node in nodes:
        assert wait_until(lambda: sentinel_master(nodes, node) == master.ip, 30), node.name
        name = node.vars["redis_sentinel_master_name"]
        port = node.vars["redis_sentinel_port"]
        assert wait_until(lambda: admin(node, node, "SENTINEL", "master", name, port=port)
                          .split("num-other-sentinels\n")[-1].split("\n")[0] == "2", 30), node.name


def test_sentinel_refuses_clients_without_its_password(client, nodes):
    node = nodes[0]
    out = client.run(f"timeout 10 redis-cli -h {node.ip} -p {node.vars['redis_sentinel_port']} "
                     f"SENTINEL masters", check=False).stdout
    assert "NOAUTH" in out, out


def test_replicas_refuse_writes(client, nodes):
    replica = [n for n in nodes if n not in master_of(nodes)][0]
    app = replica.vars["redis_users"][0]
    out = client.run(f"REDISCLI_AUTH={shlex.quote(app['password'])} redis-cli -h {replica.ip} --user app "
                     f"--no-auth-warning SET app:x 1", check=False).stdout
    assert "READONLY" in out, out


@pytest.fixture
def no_restart(nodes):
    """Keep systemd from restarting a killed Redis at once, so that the master stays dead."""
    dropin = "/run/systemd/system/redis-server.service.d"
    for n in nodes:
        n.run(f"mkdir -p {dropin} && printf '[Service]\\nRestart=no\\n' > {dropin}/test-no-restart.conf "
              "&& systemctl daemon-reload")
    yield
    for n in nodes:
        n.run(f"rm -f {dropin}/test-no-restart.conf && systemctl daemon-reload && systemctl start redis-server")


def test_sigkill_of_the_master_promotes_a_replica_and_writes_go_on(client, nodes, no_restart):
    old = master_of(nodes)[0]
    v = old.vars
    app = v["redis_users"][0]
    client.run(f"cat > /tmp/sentinel_writer.py <<'EOF'\n{WRITER.read_text()}\nEOF")
    prefix = f"app:{new_id('failover')}"
    sentinels = " ".join(f"--sentinel {n.ip}:{v['redis_sentinel_port']}" for n in nodes)
    seconds = 25
    client.run(f"setsid python3 /tmp/sentinel_writer.py {sentinels} "
               f"--sentinel-password {shlex.quote(v['redis_sentinel_password'])} "
               f"--master {v['redis_sentinel_master_name']} --user app --password {shlex.quote(app['password'])} "
               f"--prefix {prefix} --seconds {seconds} > /tmp/writer.json 2>/tmp/writer.err &")
    time.sleep(4)
    old.run("systemctl kill --signal=SIGKILL redis-server")
    killed_at = time.monotonic()
    assert wait_until(lambda: [n for n in master_of([x for x in nodes if x is not old])], 60, 0.2), roles(nodes)
    promoted_after = time.monotonic() - killed_at
    new = master_of([x for x in nodes if x is not old])[0]
    time.sleep(max(0, seconds + 3 - (time.monotonic() - killed_at) - 4))
    assert wait_until(lambda: client.run("test -s /tmp/writer.json", check=False).rc == 0, 30), \
        client.run("cat /tmp/writer.err", check=False).stdout
    report = json.loads(client.run("cat /tmp/writer.json").stdout)
    # What the new master holds of what was acknowledged.
    keys = set(admin(new, new, "--scan", "--pattern", f"{prefix}:*").split())
    present = {int(k.rsplit(":", 1)[1]) for k in keys}
    lost_acked = sorted(set(report["acked"]) - present)
    lost_replicated = sorted(set(report["replicated"]) - present)
    after = [n for n in report["acked"] if n > max(report["acked"]) - 10]
    print(f"\nMEASURED Sentinel failover: {old.name} SIGKILLed, {new.name} promoted after {promoted_after:.1f}s; "
          f"longest write gap {report['max_gap']:.2f}s; attempts {report['attempts']}, "
          f"acknowledged {len(report['acked'])}, replicated (WAIT 1) {len(report['replicated'])}, "
          f"errors {report['errors']}, acknowledged but lost {len(lost_acked)}, "
          f"replicated but lost {len(lost_replicated)}; masters seen {report['masters_seen']}")
    assert new.ip in report["masters_seen"][-1], report["masters_seen"]
    assert after and all(n in present for n in after), "the client did not keep writing to the new master"
    assert lost_replicated == [], lost_replicated


def test_the_killed_node_returns_as_a_replica_of_the_new_master(nodes):
    assert wait_until(lambda: len(master_of(nodes)) == 1, 60), roles(nodes)
    masters = master_of(nodes)
    assert wait_until(lambda: "connected_slaves:2" in admin(masters[0], masters[0], "INFO", "replication"), 60)


def test_a_converge_after_the_failover_keeps_the_new_master(nodes):
    master = master_of(nodes)[0]
    proc = converge("redis_replicated")
    assert proc.returncode == 0, proc.stdout[-3000:]
    recap = proc.stdout[proc.stdout.rindex("PLAY RECAP"):]
    assert recap.count("changed=0") == len(nodes), recap
    assert master_of(nodes) == [master]
