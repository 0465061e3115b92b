"""What a Redis node must do: refuse strangers, keep application users to their keys and away from
dangerous commands, keep what store mode acknowledged, and evict instead of failing in cache mode.
Every check is made with redis-cli from another host."""

import shlex
import time

import pytest
from benchlib import new_id, run_bad_input, wait_until


def cli(client, node, *args, user=None, password=None, check=False):
    """redis-cli on the client host against node; returns the stripped output."""
    auth = ""
    if user:
        auth = f"REDISCLI_AUTH={shlex.quote(password)} "
        user_flag = f"--user {shlex.quote(user)} "
    else:
        user_flag = ""
    command = (f"{auth}timeout 20 redis-cli -h {node.ip} -p {node.vars['redis_port']} {user_flag}"
               f"--no-auth-warning " + " ".join(shlex.quote(str(a)) for a in args) + " 2>&1")
    return client.run(command, check=check).stdout.strip()


def app(node):
    return [u for u in node.vars["redis_users"] if u["name"] == "app"][0]


def as_app(client, node, *args):
    user = app(node)
    return cli(client, node, *args, user=user["name"], password=user["password"])


def as_admin(client, node, *args):
    return cli(client, node, *args, user=node.vars["redis_admin_user"], password=node.vars["redis_admin_password"])


@pytest.fixture(params=["redis-cache", "redis-store"])
def node(request, cache, store):
    return {"redis-cache": cache, "redis-store": store}[request.param]


# ---------------------------------------------------------------- who may connect


def test_unauthenticated_client_from_another_host_is_refused(client, node):
    assert "NOAUTH" in cli(client, node, "PING")
    assert "NOAUTH" in cli(client, node, "GET", "app:x")


def test_default_user_cannot_log_in_even_without_password(client, node):
    out = cli(client, node, "AUTH", "default", "")
    assert "WRONGPASS" in out or "ERR" in out, out
    assert "WRONGPASS" in cli(client, node, "PING", user="default", password="anything")


def test_wrong_password_is_refused(client, node):
    assert "WRONGPASS" in cli(client, node, "PING", user="app", password="not-the-password")


def test_redis_listens_only_on_the_configured_addresses(node):
    """The scenario binds loopback and the node's own address (redis_bind_addresses in molecule.yml)."""
    port = f":{node.vars['redis_port']}"
    listening = [line.split()[3] for line in node.run("ss -Hltn").stdout.splitlines() if line.split()]
    addresses = sorted(a.rsplit(":", 1)[0] for a in listening if a.endswith(port))
    assert addresses == sorted(["127.0.0.1", node.ip]), addresses


# ---------------------------------------------------------------- what the application user may do


def test_application_user_reads_and_writes_its_own_keys(client, node):
    key = f"app:{new_id('k')}"
    assert as_app(client, node, "SET", key, "hello") == "OK"
    assert as_app(client, node, "GET", key) == "hello"
    assert as_app(client, node, "DEL", key) == "1"


def test_application_user_is_refused_other_keys(client, node):
    out = as_app(client, node, "SET", "billing:secret", "x")
    assert "NOPERM" in out, out
    assert "NOPERM" in as_app(client, node, "GET", "billing:secret")


@pytest.mark.parametrize("command", [["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "GET", "maxmemory"],
                                     ["KEYS", "*"], ["SHUTDOWN"], ["ACL", "LIST"], ["REPLICAOF", "NO", "ONE"]])
def test_dangerous_commands_are_refused_to_application_users(client, node, command):
    assert "NOPERM" in as_app(client, node, *command)


DANGEROUS = ["FLUSHALL", "FLUSHDB", "CONFIG SET maxmemory 1", "DEBUG SLEEP 0", "KEYS *", "SHUTDOWN",
             "ACL SETUSER x", "MONITOR", "SAVE", "BGSAVE", "REPLICAOF NO ONE", "MODULE LOAD /x.so",
             "MIGRATE h 1 app:k 0 1", "RESTORE app:k 0 v", "SORT app:k", "SWAPDB 0 1"]


@pytest.mark.parametrize("user", ["app", "greedy"])
def test_acl_denies_every_dangerous_command_to_application_users(client, node, user):
    """Redis's own ACL check (ACL DRYRUN), for commands whose call would do harm even once."""
    answers = {c: as_admin(client, node, "ACL", "DRYRUN", user, *c.split()) for c in DANGEROUS}
    allowed = {c: a for c, a in answers.items() if "no permissions" not in a}
    assert allowed == {}, f"{user} is not denied: {allowed}"
    assert as_admin(client, node, "ACL", "DRYRUN", user, "GET", "app:x") == "OK"


@pytest.mark.parametrize("command", [["FLUSHALL"], ["CONFIG", "SET", "maxmemory", "1"], ["KEYS", "*"]])
def test_a_user_given_all_commands_still_gets_no_dangerous_ones(client, node, command):
    greedy = [u for u in node.vars["redis_users"] if u["name"] == "greedy"][0]
    out = cli(client, node, *command, user="greedy", password=greedy["password"])
    assert "NOPERM" in out, out
    assert cli(client, node, "SET", "anything:x", "1", user="greedy", password=greedy["password"]) == "OK"


def test_admin_user_has_the_commands_the_others_do_not(client, node):
    """Control: the refusals above are the ACL's doing, not missing commands."""
    assert as_admin(client, node, "CONFIG", "GET", "maxmemory-policy").splitlines()[0] == "maxmemory-policy"
    assert as_admin(client, node, "ACL", "WHOAMI") == node.vars["redis_admin_user"]


def test_acl_file_holds_no_password(node):
    acl = node.run("cat /etc/redis/users.acl").stdout
    for user in node.vars["redis_users"]:
        assert user["password"] not in acl
    assert node.vars["redis_admin_password"] not in acl
    f = node.host.file("/etc/redis/users.acl")
    assert (f.user, f.mode) == ("redis", 0o640)


# ---------------------------------------------------------------- store mode keeps what it acknowledged


def test_store_mode_write_survives_a_restart(client, store):
    key, value = f"app:{new_id('restart')}", "kept"
    assert as_app(client, store, "SET", key, value) == "OK"
    store.run("systemctl restart redis-server")
    assert wait_until(lambda: as_app(client, store, "PING") == "PONG", 30)
    assert as_app(client, store, "GET", key) == value


def test_store_mode_write_survives_sigkill_after_a_second(client, store):
    """appendfsync everysec: a write acknowledged more than a second before a crash is on disk."""
    key, value = f"app:{new_id('crash')}", "kept-after-sigkill"
    assert as_app(client, store, "SET", key, value) == "OK"
    time.sleep(2)
    pid_before = store.run("systemctl show -P MainPID redis-server").stdout.strip()
    store.run("systemctl kill --signal=SIGKILL redis-server")
    assert wait_until(lambda: store.run("systemctl show -P MainPID redis-server").stdout.strip() not in
                      ("0", pid_before), 30)
    assert wait_until(lambda: as_app(client, store, "PING") == "PONG", 30)
    assert as_app(client, store, "GET", key) == value


def test_store_mode_refuses_writes_when_full_instead_of_evicting(client, store):
    limit = int(as_admin(client, store, "CONFIG", "GET", "maxmemory").splitlines()[1])
    kept = f"app:{new_id('kept')}"
    assert as_app(client, store, "SET", kept, "must-not-be-evicted") == "OK"
    try:
        replies = fill(client, store, f"app:fill:{new_id('s')}", 3 * limit // 2 // 4096, 4096)
        refused = [r for r in replies if r.startswith("OOM")]
        assert refused, "store mode accepted more than its memory limit"
        stats = dict(line.split(":", 1) for line in as_admin(client, store, "INFO").splitlines() if ":" in line)
        assert int(stats["evicted_keys"]) == 0
        assert as_app(client, store, "GET", kept) == "must-not-be-evicted"
    finally:
        as_admin(client, store, "FLUSHALL")


# ---------------------------------------------------------------- cache mode evicts


def fill(client, node, prefix, count, size):
    """Write count keys of size bytes as the application user; return the replies."""
    user = app(node)
    value = "x" * size
    script = (f"for i in $(seq 1 {count}); do echo \"SET {prefix}:$i {value}\"; done | "
              f"REDISCLI_AUTH={shlex.quote(user['password'])} redis-cli -h {node.ip} --user app --no-auth-warning")
    return client.run(script).stdout.splitlines()


def test_cache_mode_evicts_instead_of_failing_when_memory_is_full(client, cache):
    limit = int(as_admin(client, cache, "CONFIG", "GET", "maxmemory").splitlines()[1])
    size, count = 4096, 3 * limit // 4096
    replies = fill(client, cache, f"app:fill:{new_id('c')}", count, size)
    errors = [r for r in replies if r != "OK"]
    assert not errors, f"{len(errors)} writes failed, e.g. {errors[:3]}"
    stats = dict(line.split(":", 1) for line in as_admin(client, cache, "INFO").splitlines() if ":" in line)
    print(f"\nMEASURED cache mode: wrote {count * size / 2**20:.0f} MiB into a {limit / 2**20:.0f} MiB limit, "
          f"evicted_keys {stats['evicted_keys']}, used_memory {int(stats['used_memory']) / 2**20:.1f} MiB")
    assert int(stats["evicted_keys"]) > 0
    assert int(stats["used_memory"]) <= limit * 1.1


def test_cache_mode_writes_nothing_to_disk(client, cache):
    assert as_admin(client, cache, "CONFIG", "GET", "appendonly").splitlines()[1] == "no"
    assert as_admin(client, cache, "CONFIG", "GET", "save").splitlines()[1:] in ([], [""])


# ---------------------------------------------------------------- host settings


def test_connection_backlog_is_raised_where_the_container_allows(node):
    assert int(node.run("cat /proc/sys/net/core/somaxconn").stdout) >= node.vars["redis_tcp_backlog"]


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    ({"redis_admin_password": "short"}, ["redis_admin_password must be set"]),
    ({"redis_bind_addresses": ["redis.example.com"]}, ["redis_bind_addresses", "redis.example.com"]),
    ({"redis_users": [{"name": "app", "password": "app-secret-0123", "commands": ["all"]}]}, ["redis_users[0]"]),
    ({"redis_mode": "database"}, ["redis_mode"]),
    ({"redis_maxmemory": "lots"}, ["redis_maxmemory"]),
    # A group of two cannot elect a master: the role asks for three or more.
    ({"redis_replication_group": "redis_standalone"}, ["redis_replication_group"]),
]


@pytest.mark.parametrize("extra_vars,expected", BAD_INPUTS, ids=[list(b[0])[0] for b in BAD_INPUTS])
def test_bad_input_fails_naming_the_variable_before_anything_changes(store, extra_vars, expected):
    run_bad_input(store, ["/etc/redis/redis.conf", "/etc/redis/users.acl"], extra_vars, expected)
