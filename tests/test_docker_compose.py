"""docker-compose.yaml: the local Docker stack stays consistent with the lock, the repo and the team rules.

No Docker engine runs here, so the file is checked by reading it, and its helper files are run for real:
the role SQL on a real PostgreSQL 15 started with the stack's server flags, the HAProxy config through
`haproxy -c`, the whole file through `docker compose config` when that client is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")
WHOLE_INTERPOLATION = re.compile(r"^\$\{(?P<name>\w+):-(?P<default>[^}]*)\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET_KEY|TOKEN", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")
DEMO_PREFIX = "demo-"
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
REPLICATION_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_worker_processes": "16",
    "track_commit_timestamp": "on",
}


def with_defaults(value: str) -> str:
    """What compose makes of a value when no variable is set: ${VAR:-default} -> default, $$ -> $."""
    return INTERPOLATION.sub(lambda m: m["default"] or "", value).replace("$$", "$")


def pinned_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([^\s\\;]+)", (REPO / "requirements.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def airflow_services(services) -> dict:
    found = {
        name: spec
        for name, spec in services.items()
        if with_defaults(spec.get("image", "")).startswith("apache/airflow:")
    }
    assert found, "no service runs the Airflow image"
    return found


def environment_of(spec: dict) -> dict:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def bind_sources(spec: dict) -> list[str]:
    sources = []
    for volume in spec.get("volumes", []):
        source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":", 1)[0]
        if source.startswith((".", "/", "~", "$")):
            sources.append(with_defaults(source))
    return sources


def published_ports(spec: dict) -> list[str]:
    return [with_defaults(str(port)) for port in spec.get("ports", [])]


def test_stack_has_every_component(services):
    expected = {
        "postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
        "airflow-triggerer", "moto", "pg-old", "pg-new", "haproxy", "redis", "airflow-worker", "otel-collector",
    }
    assert expected <= set(services)
    assert with_defaults(services["postgres"]["image"]) == "postgres:16"
    assert services["postgres"]["healthcheck"]["test"]


def test_airflow_services_share_the_common_anchor(compose, airflow_services):
    assert "x-airflow-common" in compose
    commands = {str(spec.get("command")) for spec in airflow_services.values()}
    assert {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"} <= commands


def test_every_bind_mounted_host_path_exists(services):
    missing = [
        f"{name}: {source}"
        for name, spec in services.items()
        for source in bind_sources(spec)
        if not (REPO / source).exists()
    ]
    assert not missing, f"bind-mounted paths missing from the repo: {missing}"


def test_airflow_finds_the_package(airflow_services):
    wanted = {"./dags": "/opt/airflow/dags", "./plugins": "/opt/airflow/plugins", "./include": "/opt/airflow/include"}
    for name, spec in airflow_services.items():
        mounts = {}
        for volume in spec["volumes"]:
            source, target, *_ = volume.split(":")
            mounts[source] = target
        for source, target in wanted.items():
            assert mounts.get(source) == target, f"{name} does not mount {source} at {target}"


def test_every_airflow_service_has_include_on_pythonpath(airflow_services):
    for name, spec in airflow_services.items():
        pythonpath = with_defaults(str(environment_of(spec).get("PYTHONPATH", "")))
        assert "/opt/airflow/include" in pythonpath.split(":"), f"{name}: PYTHONPATH={pythonpath!r}"


def test_airflow_image_matches_the_locked_airflow(airflow_services):
    expected = f"apache/airflow:{pinned_version('apache-airflow')}-python3.11"
    for name, spec in airflow_services.items():
        assert with_defaults(spec["image"]) == expected, name


def test_moto_image_matches_the_locked_moto(services):
    assert with_defaults(services["moto"]["image"]) == f"motoserver/moto:{pinned_version('moto')}"


def test_local_executor_by_default_and_no_installs_at_start(airflow_services):
    for name, spec in airflow_services.items():
        env = environment_of(spec)
        assert with_defaults(env["AIRFLOW__CORE__EXECUTOR"]) == "LocalExecutor", name
        assert env["_PIP_ADDITIONAL_REQUIREMENTS"] == "", name


CELERY_SERVICES = {"redis", "airflow-worker"}


def test_only_the_celery_services_sit_behind_the_celery_profile(services):
    profiled = {name: spec["profiles"] for name, spec in services.items() if "profiles" in spec}
    expected = {**{name: ["celery"] for name in CELERY_SERVICES}, "airflow-retention": ["maintenance"]}
    assert profiled == expected, "the default stack stays as it was"


def test_metadata_retention_purges_only_rows_older_than_90_days_or_more(services):
    retention = services["airflow-retention"]
    script = retention["command"][-1]
    assert "airflow db clean --clean-before-timestamp" in script and '-lt 90 ]' in script
    assert with_defaults(environment_of(retention)["RETENTION_DAYS"]) == "100"


def test_one_variable_switches_every_component_to_the_celery_executor(airflow_services):
    for name, spec in airflow_services.items():
        executor = environment_of(spec)["AIRFLOW__CORE__EXECUTOR"]
        assert WHOLE_INTERPOLATION.match(executor)["name"] == "AIRFLOW_EXECUTOR", name
    assert "AIRFLOW_EXECUTOR=CeleryExecutor docker compose --profile celery up" in COMPOSE_FILE.read_text()


def test_celery_broker_is_the_redis_service_and_results_go_to_the_metadata_database(airflow_services, services):
    redis = services["redis"]
    assert with_defaults(redis["image"]).startswith("redis:")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert not redis.get("ports"), "the broker is reachable inside the stack only"
    for name, spec in airflow_services.items():
        env = {key: with_defaults(str(value)) for key, value in environment_of(spec).items()}
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0", name
        metadata = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split("://", 1)[1]
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+postgresql://{metadata}", name


def test_worker_runs_celery_with_warm_shutdown_once_redis_and_the_api_are_up(services):
    worker = services["airflow-worker"]
    assert worker["command"] == "celery worker"
    assert environment_of(worker)["DUMB_INIT_SETSID"] == "0"
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    conditions = {name: rule["condition"] for name, rule in worker["depends_on"].items()}
    assert conditions["redis"] == conditions["airflow-apiserver"] == "service_healthy"
    assert conditions["airflow-init"] == "service_completed_successfully"


def test_init_migrates_and_creates_the_admin(services):
    env = environment_of(services["airflow-init"])
    assert env["_AIRFLOW_DB_MIGRATE"] == "true"
    assert env["_AIRFLOW_WWW_USER_CREATE"] == "true"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_api_server_is_published_on_loopback_only(services):
    assert published_ports(services["airflow-apiserver"]) == ["127.0.0.1:8080:8080"]


def test_every_published_port_is_on_loopback_below_the_ephemeral_range(services):
    for name, spec in services.items():
        for port in published_ports(spec):
            host_ip, host_port, _container_port = port.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            assert int(host_port) < 32768, f"{name} publishes {port} in the ephemeral range"


def test_secrets_come_from_the_environment_with_demo_defaults(services):
    offenders = []
    for owner, spec in services.items():
        for key, raw in environment_of(spec).items():
            raw = str(raw)
            if SECRET_NAME.search(key):
                match = WHOLE_INTERPOLATION.match(raw)
                if not (match and (match["default"] == "" or match["default"].startswith(DEMO_PREFIX))):
                    offenders.append(f"{owner}.{key}")
            for credential in URL_CREDENTIALS.finditer(raw):
                match = WHOLE_INTERPOLATION.match(credential["password"])
                if not (match and match["default"].startswith(DEMO_PREFIX)):
                    offenders.append(f"{owner}.{key} (URL password)")
            if key.startswith("AIRFLOW_CONN_"):
                password = json.loads(raw).get("password", "")
                match = WHOLE_INTERPOLATION.match(password)
                if not (match and match["default"].startswith(DEMO_PREFIX)):
                    offenders.append(f"{owner}.{key} (connection password)")
    assert not offenders, f"plaintext or unmarked secrets: {offenders}"


def test_each_variable_has_one_default_everywhere():
    defaults: dict[str, set[str]] = {}
    for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text()):
        defaults.setdefault(match["name"], set()).add(match["default"] or "")
    conflicting = {name: values for name, values in defaults.items() if len(values) > 1}
    assert not conflicting, f"the same variable has different defaults: {conflicting}"


def connection(airflow_services: dict, variable: str) -> dict:
    raw = environment_of(airflow_services["airflow-scheduler"])[variable]
    return json.loads(with_defaults(raw))


def test_connections_point_at_the_demo_topology(airflow_services, services):
    aws = connection(airflow_services, "AIRFLOW_CONN_PGU_AWS")
    assert aws["conn_type"] == "aws"
    assert aws["extra"]["endpoint_url"] == "http://moto:5000"

    admin = connection(airflow_services, "AIRFLOW_CONN_PGU_DB_ADMIN")
    replication = connection(airflow_services, "AIRFLOW_CONN_PGU_REPLICATION")
    server_env = {key: with_defaults(str(value)) for key, value in environment_of(services["pg-old"]).items()}
    assert admin["conn_type"] == replication["conn_type"] == "postgres"
    assert admin["host"] in services and replication["host"] in services
    assert (admin["login"], admin["password"]) == ("postgres", server_env["POSTGRES_PASSWORD"])
    assert (replication["login"], replication["password"]) == ("replicator", server_env["PGU_REPLICATION_PASSWORD"])


def test_remote_logging_is_configurable_and_off_by_default(airflow_services):
    for name, spec in airflow_services.items():
        env = environment_of(spec)
        assert with_defaults(env["AIRFLOW__LOGGING__REMOTE_LOGGING"]).lower() == "false", name
        assert with_defaults(env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"]).startswith("s3://"), name
        assert "AIRFLOW__LOGGING__ENCRYPT_S3_LOGS" in env, name
    assert "airflow db clean" in COMPOSE_FILE.read_text()


OTEL_COLLECTOR_IMAGE = re.compile(r"^otel/opentelemetry-collector(-contrib)?:\d+\.\d+\.\d+$")


def collector_config(services) -> dict:
    mounts = dict(volume.split(":")[:2] for volume in services["otel-collector"]["volumes"])
    source = next(source for source, target in mounts.items() if target.endswith("config.yaml"))
    command = " ".join(services["otel-collector"]["command"])
    assert f"--config={mounts[source]}" in command, "the collector runs the mounted config"
    return yaml.safe_load((REPO / source).read_text())


def test_an_opentelemetry_collector_with_a_pinned_image_receives_otlp_and_serves_prometheus(services):
    collector = services["otel-collector"]
    assert OTEL_COLLECTOR_IMAGE.match(with_defaults(collector["image"])), collector["image"]
    config = collector_config(services)
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    assert "otlp" in pipelines["metrics"]["receivers"] and "otlp" in pipelines["traces"]["receivers"]
    for pipeline in pipelines.values():
        assert set(pipeline["exporters"]) <= set(config["exporters"]), pipeline
        assert set(pipeline.get("processors", [])) <= set(config.get("processors", {})), pipeline
    assert "prometheus" in pipelines["metrics"]["exporters"], "the contrib distribution's Prometheus exporter"
    assert "contrib" in collector["image"]
    prometheus_port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert [port.rsplit(":", 1)[1] for port in published_ports(collector)] == [prometheus_port]


def test_every_airflow_component_sends_metrics_and_traces_to_the_collector(airflow_services):
    for name, spec in airflow_services.items():
        env = {key: with_defaults(str(value)) for key, value in environment_of(spec).items()}
        assert env["AIRFLOW__METRICS__OTEL_ON"].lower() == env["AIRFLOW__TRACES__OTEL_ON"].lower() == "true", name
        assert env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] == "http://otel-collector:4318/v1/metrics", name
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://otel-collector:4318/v1/traces", name
        assert env["OTEL_TRACES_EXPORTER"] == "otlp_proto_http", name
        assert "STATSD_ON" not in " ".join(env), "one metrics backend: OpenTelemetry"
        assert "otel-collector" in spec["depends_on"], name


def server_flags(spec: dict) -> list[str]:
    argv = shlex.split(spec["command"]) if isinstance(spec["command"], str) else list(spec["command"])
    assert argv[0] == "postgres"
    return argv[1:]


def test_demo_servers_run_with_replication_settings(services):
    assert with_defaults(services["pg-old"]["image"]) == "postgres:15"
    assert with_defaults(services["pg-new"]["image"]) == "postgres:17"
    for name in ("pg-old", "pg-new"):
        flags = server_flags(services[name])
        settings = dict(value.split("=", 1) for flag, value in zip(flags[::2], flags[1::2]) if flag == "-c")
        assert settings == REPLICATION_SETTINGS, name
        mounts = [volume.split(":")[:2] for volume in services[name]["volumes"] if volume.startswith("./")]
        assert ["./docker/init-roles.sql", "/docker-entrypoint-initdb.d/10-init-roles.sql"] in mounts, name
        assert services[name]["healthcheck"]["test"], name


def haproxy_config() -> str:
    return (REPO / "docker" / "haproxy.cfg").read_text()


def test_haproxy_config_routes_both_frontends_to_source_first(services):
    assert "./docker/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    assert with_defaults(services["haproxy"]["image"]) == "haproxy:2.6"
    sections = re.split(r"^(?=\S)", haproxy_config(), flags=re.M)
    by_header = {section.splitlines()[0].strip(): section for section in sections if section.strip()}
    for role in ("pg_write", "pg_read"):
        assert f"default_backend {role}" in by_header[f"frontend {role}"]
        backend = by_header[f"backend {role}"]
        assert re.search(r"^\s*server source pg-old:5432 weight 100\b", backend, re.M), role
        assert re.search(r"^\s*server target pg-new:5432 weight 0\b", backend, re.M), role
    assert re.search(r"^\s*stats socket ipv4@0\.0\.0\.0:9999 level admin\s*$", by_header["global"], re.M)


def test_haproxy_accepts_the_config():
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(REPO / "docker" / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def psql(socket_dir: str, user: str, password: str, sql: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        as_postgres([str(PG15_BIN / "psql"), "-h", socket_dir, "-U", user, "-d", "postgres", "-XAtq", "-f", "-"]),
        input=sql, capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {}), "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
    )


def test_init_roles_sql_on_a_real_postgres_with_the_stack_flags(services):
    """The entrypoint's way: psql runs the file with the container's environment on a fresh server."""
    if not (PG15_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG15_BIN}")
    server_env = {key: with_defaults(str(value)) for key, value in environment_of(services["pg-old"]).items()}
    admin_password = server_env["POSTGRES_PASSWORD"]
    work = tempfile.mkdtemp(prefix="pgu-compose-", dir="/tmp")
    data, pwfile = f"{work}/data", f"{work}/pw"
    Path(pwfile).write_text(admin_password + "\n")
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(pwfile, "postgres")
    server_options = " ".join(
        [f"-c listen_addresses='' -k {work}", *(shlex.quote(flag) for flag in server_flags(services["pg-old"]))]
    )
    try:
        run = lambda argv: subprocess.run(as_postgres(argv), capture_output=True, text=True, timeout=120)  # noqa: E731
        initdb = run([str(PG15_BIN / "initdb"), "-D", data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}"])
        assert initdb.returncode == 0, initdb.stderr
        started = run([str(PG15_BIN / "pg_ctl"), "-D", data, "-w", "-l", f"{work}/log", "-o", server_options, "start"])
        assert started.returncode == 0, started.stderr + Path(f"{work}/log").read_text()

        applied = psql(work, "postgres", admin_password, (REPO / "docker" / "init-roles.sql").read_text(), server_env)
        assert applied.returncode == 0, applied.stderr

        roles = psql(work, "postgres", admin_password, (
            "SELECT rolname, rolcanlogin, rolreplication FROM pg_roles "
            "WHERE rolname IN ('app', 'replicator') ORDER BY 1;"
            "SHOW wal_level; SHOW track_commit_timestamp; SHOW max_replication_slots;"
        ))
        assert roles.stdout.split() == ["app|t|f", "replicator|t|t", "logical", "on", "20"], roles.stderr

        as_replicator = psql(work, "replicator", server_env["PGU_REPLICATION_PASSWORD"], "SELECT current_user;")
        assert as_replicator.stdout.strip() == "replicator", as_replicator.stderr
        as_app = psql(work, "app", server_env["PGU_APP_PASSWORD"], "SELECT current_user;")
        assert as_app.stdout.strip() == "app", as_app.stderr
        wrong = psql(work, "replicator", "not-the-password", "SELECT 1;")
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    finally:
        if Path(f"{data}/postmaster.pid").exists():
            subprocess.run(as_postgres([str(PG15_BIN / "pg_ctl"), "-D", data, "-m", "immediate", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose`: neither needs a running engine for `config`."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for argv in candidates:
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return argv
    return None


def test_docker_compose_config_accepts_the_file():
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client installed (docker CLI with the compose plugin, or docker-compose)")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COMPOSE_", "DOCKER_"))}
    for profile in ([], ["--profile", "celery"]):
        result = subprocess.run([*client, "-f", str(COMPOSE_FILE), *profile, "config", "-q"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, profile + [result.stdout + result.stderr]
