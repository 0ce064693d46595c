"""Fault injection for the traffic switch: a cutover (or a rollback) killed with SIGKILL at a step boundary under a
write load, then the documented recovery, then what the applications got: lost or duplicated commits, instants
with two writable nodes, seconds without writes. Shared by tests/integration/test_crash_safety.py and bench/faults.py.

The switch runs in a child process (tests/.../switch_child is this module run with `python -m topology.faults`)
that kills itself right after the named phase is recorded or the named step returns: a harness-made fault, the
package is not changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psycopg2

from topology.load import BENCH_TABLE_DDL, OK, Load

DATABASE, APP_ROLE = "app", "app"
# Where the cutover can die: after each recorded phase or timed step, in order.
CUTOVER_KILL_POINTS = ("fenced", "caught_up", "sequences", "reverse_prepared", "switching", "target_unfenced",
                       "switched", "reverse_started")
ROLLBACK_KILL_POINTS = ("target_fenced", "caught_up", "sequences", "switching", "source_unfenced", "switched")
RECOVERIES = ("watchdog", "rollback", "clear")


@dataclass
class Outcome:
    action: str
    kill_at: str
    recovery: str
    killed: bool
    writer: str | None
    lost: int
    duplicated: int
    two_writers_seen: int
    outage_s: float
    acked: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class WritableProbe:
    """Tries a rolled-back INSERT as the application role on each node directly, over and over, and keeps the
    intervals in which each node accepted it: two overlapping intervals are two writable nodes."""

    def __init__(self, ports: dict[str, int], password: str, interval: float = 0.005):
        self.ports, self.password, self.interval = ports, password, interval
        self.accepted: dict[str, list[tuple[float, float]]] = {name: [] for name in ports}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(name,), daemon=True) for name in ports]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _loop(self, name: str) -> None:
        while not self._stop.is_set():
            accepted = insert_window(self.ports[name], self.password)
            if accepted:
                self.accepted[name].append(accepted)
            time.sleep(self.interval)

    def overlaps(self) -> int:
        names = list(self.accepted)
        a, b = self.accepted[names[0]], self.accepted[names[1]]
        return sum(1 for s0, e0 in a for s1, e1 in b if s0 < e1 and s1 < e0)


def writable(port: int, password: str) -> bool:
    return insert_window(port, password) is not None


def insert_window(port: int, password: str) -> tuple[float, float] | None:
    """When the node accepted a rolled-back INSERT as the application role: the window from just before the statement
    was sent to its answer (the connection's set-up is left out: on a busy machine it can take longer than the whole
    fenced switch, and an interval including it would overlap the other node's without both taking writes)."""
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, dbname=DATABASE, user=APP_ROLE, password=password,
                                      connect_timeout=1, application_name="writable_probe")
    except psycopg2.Error:
        return None
    try:
        with connection.cursor() as cursor:
            began = time.monotonic()
            cursor.execute("INSERT INTO public.bench_log (client, seq) VALUES (-2, 1)")
            return began, time.monotonic()
    except psycopg2.Error:
        return None
    finally:
        try:
            connection.rollback()
            connection.close()
        except psycopg2.Error:
            pass


def add_bench_table(topo) -> None:
    with topo.old_pg.connect("postgres", dbname=DATABASE) as connection, connection.cursor() as cursor:
        cursor.execute(f"SET ROLE {APP_ROLE}")
        cursor.execute(BENCH_TABLE_DDL)
    connection.close()


def app_dsn(topo) -> str:
    return (f"host=127.0.0.1 port={topo.ports.haproxy_write} dbname={DATABASE} user={APP_ROLE} "
            f"password={topo.credentials[APP_ROLE]} connect_timeout=2 application_name=fault_load")


def child_spec(topo, conf: dict, action: str, kill_at: str, token: str) -> dict:
    return {"moto_url": topo.moto_url, "conf": conf, "action": action, "kill_at": kill_at, "token": token,
            "admin": topo.credentials["postgres"], "replication": topo.credentials["replicator"],
            "probe": topo.credentials["prober"]}


def run_child(spec: dict, timeout: float = 120) -> int:
    """The switch in a child process; returns its exit code (-9 when it killed itself at the kill point)."""
    result = subprocess.run([sys.executable, "-m", "topology.faults"], input=json.dumps(spec), text=True,
                            capture_output=True, timeout=timeout, env=os.environ.copy())
    if result.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"switch child failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.returncode


def run_case(topo, conf: dict, upgrade, action: str, kill_at: str, recovery: str, *, settle_s: float = 1.5,
             clients: int = 2, rate: float = 100.0) -> Outcome:
    """upgrade: replicating (in sync) with conf on topo, the bench table included; see the module's doc."""
    ports = {"source": topo.old_pg.port, "target": topo.new_pg.port}
    load = Load(app_dsn(topo), clients, rate, max_seconds=300)
    load.start()
    notes: list[str] = []
    with WritableProbe(ports, topo.credentials[APP_ROLE]) as probe:
        time.sleep(settle_s)
        if action == "rollback":
            upgrade.cutover("before-rollback")
            time.sleep(settle_s)
        spec = child_spec(topo, conf, action, kill_at, f"{action}-killed")
        started = time.monotonic()
        code = run_child(spec)
        killed = code == -signal.SIGKILL
        if not killed:
            notes.append(f"the child finished without reaching {kill_at}")
        if recovery == "watchdog":
            upgrade.recover_switch("watchdog")
        elif recovery == "rollback":
            upgrade.rollback("rollback-after-kill")
        else:
            try:
                (upgrade.rollback if action == "rollback" else upgrade.cutover)(f"{action}-again")
            except Exception as error:  # a cleared task that refuses is an outcome too
                notes.append(f"re-run: {type(error).__name__}: {str(error)[:160]}")
        recovered = time.monotonic()
        time.sleep(settle_s)
    logs = load.stop()
    acked_times = sorted(t for r in logs.values() for _, t, status in r["log"] if status == OK)
    outage = longest_gap(acked_times, started, recovered)
    writers = [name for name, port in ports.items() if writable(port, topo.credentials[APP_ROLE])]
    # One-way replication: exactly one writable node. Active-active (pgactive): both while they replicate.
    writer = writers[0] if len(writers) == 1 else ("both" if len(writers) == 2 and upgrade.driver().active_active else None)
    if writer is None:
        notes.append(f"writable nodes at the end: {writers}")
    acked = {(c, seq) for c, r in logs.items() for seq, _, status in r["log"] if status == OK}
    lost = duplicated = 0
    for name in writers if writer else []:  # every acknowledged commit on each node that takes writes
        server = topo.old_pg if name == "source" else topo.new_pg
        with server.connect("postgres", dbname=DATABASE) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT client, seq, count(*) FROM public.bench_log WHERE client >= 0 GROUP BY 1, 2")
            counts = {(c, s): n for c, s, n in cursor.fetchall()}
        connection.close()
        lost = max(lost, sum(1 for key in acked if key not in counts))
        duplicated = max(duplicated, sum(1 for n in counts.values() if n > 1))
    return Outcome(action, kill_at, recovery, killed, writer, lost, duplicated, probe.overlaps(), outage, len(acked), notes)


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time without an acknowledged commit from the switch's start until the recovery ended: the
    fence, the death, the recovery. Infinite when writes never came back."""
    inside = [t for t in times if start <= t]
    if not inside or inside[-1] < end:
        return float("inf")
    before = [t for t in times if t < start]
    points = ([before[-1]] if before else []) + [t for t in inside if t <= end] + [next(t for t in inside if t >= end)]
    return round(max(b - a for a, b in zip(points, points[1:])), 3)


def _child() -> int:
    spec = json.load(sys.stdin)
    from pgactive_upgrade import config
    from pgactive_upgrade.cutover import FencedSwitch
    from pgactive_upgrade.db import Credentials
    from pgactive_upgrade.upgrade import Upgrade
    from topology import aws

    kill_at = spec["kill_at"]
    advance, step = FencedSwitch._advance, FencedSwitch._step

    def advance_then_maybe_die(self, source, state, phase, mirror=None, durable=True):
        advance(self, source, state, phase, mirror, durable)
        if phase == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def step_then_maybe_die(self, name, function, *args):
        result = step(self, name, function, *args)
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    FencedSwitch._advance, FencedSwitch._step = advance_then_maybe_die, step_then_maybe_die
    rds_client = aws.client("rds", spec["moto_url"])
    if kill_at == "instance_created":  # the create call reached RDS; the step never learned it
        rds_client.meta.events.register("after-call.rds.CreateDBInstance", die)
    if kill_at == "subscription_created":
        from pgactive_upgrade.replication.native import NativeDriver

        create = NativeDriver._ensure_subscription

        def create_then_die(self, *args, **kwargs):
            create(self, *args, **kwargs)
            die()

        NativeDriver._ensure_subscription = create_then_die
    upgrade = Upgrade(config.validate(spec["conf"]), rds_client,
                      Credentials("postgres", spec["admin"]), Credentials("replicator", spec["replication"]),
                      probe=Credentials("prober", spec["probe"]), dbname=DATABASE)
    action = spec["action"]
    if action in ("cutover", "rollback"):
        getattr(upgrade, action)(spec["token"])
    else:
        getattr(upgrade, action)()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
