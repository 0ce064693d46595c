import json
import socket
from collections import Counter

import pytest
from traffic_parts import READ_FRONTEND, TARGET_PORT, WRITE_FRONTEND

from pgactive_upgrade.traffic import HAProxyController, Route, TrafficError, build_controller
from pgactive_upgrade.traffic.haproxy import runtime_command

ROUTES = [{"name": "pg_write", "carries_writes": True}, {"name": "pg_read", "carries_writes": False}]
SOURCE_ENDPOINT, TARGET_ENDPOINT = ("127.0.0.1", 26700), ("127.0.0.1", TARGET_PORT)


def controller_for(runtime_api: str, **overrides) -> HAProxyController:
    settings = {"controller": "haproxy", "haproxy": {"runtime_api": runtime_api, "routes": ROUTES,
                                                     "source_server": "source", "target_server": "target",
                                                     "set_target_address": False, **overrides}}
    return build_controller(settings, source_endpoint=SOURCE_ENDPOINT, target_endpoint=TARGET_ENDPOINT)


def answers(port: int, connections: int = 100) -> Counter:
    """Open `connections` new connections one after the other and count which server answered each."""
    seen = Counter()
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            seen[sock.makefile().readline().strip()] += 1
    return seen


def held_connection(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock, sock.makefile().readline().strip()


def is_closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_reads_back_initial_split(haproxy):
    controller = controller_for(haproxy["tcp"])
    assert controller.read_split() == {"pg_write": 0, "pg_read": 0}
    assert controller.route_names(carries_writes=False) == ["pg_read"]


@pytest.mark.parametrize("percent, tolerance", [(0, 0), (20, 2), (55, 2), (100, 0)])
def test_new_connections_follow_the_weights(haproxy, percent, tolerance):
    controller = controller_for(haproxy["tcp"])
    assert controller.set_target_percent(percent) == {"pg_write": percent, "pg_read": percent}
    assert runtime_command(haproxy["tcp"], "get weight pg_write/target").split()[0] == str(percent)
    assert runtime_command(haproxy["tcp"], "get weight pg_write/source").split()[0] == str(100 - percent)
    for frontend in (WRITE_FRONTEND, READ_FRONTEND):
        seen = answers(frontend)
        assert sum(seen.values()) == 100
        assert abs(seen["target"] - percent) <= tolerance, seen


def test_only_named_routes_change(haproxy):
    controller = controller_for(haproxy["tcp"])
    assert controller.set_target_percent(30, ["pg_read"]) == {"pg_write": 0, "pg_read": 30}
    assert answers(WRITE_FRONTEND, 20) == Counter(source=20)
    assert controller.set_target_percent(100, "pg_write") == {"pg_write": 100, "pg_read": 30}


def test_unix_socket_runtime_api(haproxy):
    controller = controller_for(haproxy["unix"])
    assert controller.set_target_percent(100) == {"pg_write": 100, "pg_read": 100}
    assert answers(WRITE_FRONTEND, 10) == Counter(target=10)


@pytest.mark.parametrize("percent", [-1, 101, 20.0, True, "20", None])
def test_rejects_bad_percent(haproxy, percent):
    controller = controller_for(haproxy["tcp"])
    with pytest.raises(ValueError, match="percent"):
        controller.set_target_percent(percent)
    assert controller.read_split() == {"pg_write": 0, "pg_read": 0}


def test_rejects_unknown_route_and_changes_nothing(haproxy):
    controller = controller_for(haproxy["tcp"])
    with pytest.raises(ValueError, match="pg_nowhere"):
        controller.set_target_percent(50, ["pg_read", "pg_nowhere"])
    with pytest.raises(ValueError, match="pg_nowhere"):
        controller.close_source_sessions(["pg_nowhere"])
    assert controller.read_split() == {"pg_write": 0, "pg_read": 0}


def test_close_source_sessions_cuts_held_connections(haproxy):
    controller = controller_for(haproxy["tcp"])
    write_conn, write_server = held_connection(WRITE_FRONTEND)
    read_conn, read_server = held_connection(READ_FRONTEND)
    assert (write_server, read_server) == ("source", "source")
    controller.set_target_percent(100)
    assert not is_closed(write_conn, 0.3), "moving weights alone must not cut established sessions"
    assert controller.close_source_sessions(["pg_write"]) == ["pg_write"]
    assert is_closed(write_conn, 5)
    assert not is_closed(read_conn, 0.3), "pg_read was not named"
    assert held_connection(WRITE_FRONTEND)[1] == "target"
    write_conn.close()
    read_conn.close()


def test_enables_a_server_in_maintenance(haproxy):
    controller = controller_for(haproxy["tcp"])
    runtime_command(haproxy["tcp"], "set weight pg_write/target 50")
    runtime_command(haproxy["tcp"], "set server pg_write/target state maint")
    assert controller.read_split()["pg_write"] == 0, "a server in maintenance takes no traffic"
    assert controller.set_target_percent(50, ["pg_write"])["pg_write"] == 50
    assert answers(WRITE_FRONTEND)["target"] == 50


def test_both_weights_zero_is_an_error(haproxy):
    controller = controller_for(haproxy["tcp"])
    runtime_command(haproxy["tcp"], "set weight pg_read/source 0")
    with pytest.raises(TrafficError, match=r"pg_read \(source weight=0 .*target weight=0 .*both 0"):
        controller.read_split()


def test_points_target_server_at_target_endpoint(haproxy_target_elsewhere):
    api = haproxy_target_elsewhere["tcp"]
    controller = controller_for(api, set_target_address=True)
    assert controller.set_target_percent(100) == {"pg_write": 100, "pg_read": 100}
    assert answers(WRITE_FRONTEND, 10) == Counter(target=10)
    for backend in ("pg_write", "pg_read"):
        target = controller._servers(backend)["target"]
        assert (target["srv_addr"], target["srv_port"], target["srv_uweight"]) == ("127.0.0.1", str(TARGET_PORT), "100")


def test_unknown_server_name_is_a_traffic_error(haproxy):
    controller = controller_for(haproxy["tcp"], target_server="blue")
    with pytest.raises(TrafficError, match="no server 'blue'"):
        controller.set_target_percent(10)
    assert runtime_command(haproxy["tcp"], "get weight pg_write/source").split()[0] == "100", "nothing half-done"


def test_unreachable_runtime_api_is_a_traffic_error(haproxy):
    controller = HAProxyController("127.0.0.1:26799", [Route("pg_write")])
    with pytest.raises(TrafficError, match="127.0.0.1:26799"):
        controller.read_split()


def test_describe_is_json_safe(haproxy):
    summary = controller_for(haproxy["tcp"], set_target_address=True).describe()
    assert json.loads(json.dumps(summary))["routes"][1] == {"name": "pg_read", "carries_writes": False}
    assert summary["target_address"] == list(TARGET_ENDPOINT)
