"""A real local Airflow that sends its metrics and traces (OpenTelemetry) to an OTLP/HTTP receiver started here,
with three users (admin, viewer, and `outsider` without any role); and one real upgrade run on it."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.airflow_real.runs import forget_earlier_upgrades, states_of
from topology.airflow_local import LocalAirflow
from topology.demo import demo_conf
from topology.load import Churn

REPO = Path(__file__).resolve().parents[2]
UPGRADE = "pgactive_rolling_upgrade"


class OtlpReceiver:
    """An OTLP/HTTP endpoint (POST /v1/traces and /v1/metrics, protobuf) keeping every span and metric data point."""

    def __init__(self, port: int):
        self.spans: list[dict] = []
        self.points: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                answer = (receiver._traces if self.path == "/v1/traces" else receiver._metrics)(body)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):  # an exporter that gave up waiting: kept anyway
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.base_url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _traces(self, body: bytes) -> bytes:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "scope": scope_spans.scope.name,
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(),
                        "duration_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    })
        return ExportTraceServiceResponse().SerializeToString()

    def _metrics(self, body: bytes) -> bytes:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )

        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        entry = {"name": metric.name, "kind": kind, "time": point.time_unix_nano,
                                 "attributes": {a.key: _value(a.value) for a in point.attributes}}
                        if kind in ("gauge", "sum"):
                            entry["value"] = getattr(point, point.WhichOneof("value"))
                        else:
                            entry.update(count=point.count, sum=point.sum)
                        self.points.append(entry)
        return ExportMetricsServiceResponse().SerializeToString()

    def metric(self, name: str) -> list[dict]:
        return [point for point in list(self.points) if point["name"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="package")
def otlp(topology):
    receiver = OtlpReceiver(topology.ports.airflow_api + 7)
    yield receiver
    receiver.close()


@pytest.fixture(scope="package")
def observed_airflow(topology, otlp, tmp_path_factory):
    base = tmp_path_factory.mktemp("observed_airflow")
    dags, plugins = base / "dags", base / "plugins"
    dags.mkdir()
    plugins.mkdir()
    for dag_file in (REPO / "dags").glob("*.py"):
        (dags / dag_file.name).symlink_to(dag_file)
    for plugin_file in (REPO / "plugins").glob("*.py"):
        (plugins / plugin_file.name).symlink_to(plugin_file)
    telemetry = {
        "AIRFLOW__METRICS__OTEL_ON": "True",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{otlp.base_url}/v1/metrics",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "AIRFLOW__TRACES__OTEL_ON": "True",
        "OTEL_TRACES_EXPORTER": "otlp_proto_http",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{otlp.base_url}/v1/traces",
        "OTEL_SERVICE_NAME": "airflow",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }
    instance = LocalAirflow(
        home=base / "home", dags_folder=dags, plugins_folder=plugins, port=topology.ports.airflow_api + 5,
        extra_env={
            **topology.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topology.new_pg.bin_dir), **telemetry,
            # outsider: a user the auth manager grants nothing (no role), to be refused
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,outsider:",
        },
        python_paths=[REPO / "include", REPO],
    )
    instance.start(timeout=240)
    yield instance
    instance.stop()


@pytest.fixture(scope="package")
def upgrade_run(observed_airflow, topology) -> dict:
    """One real upgrade (two read-traffic phases, cutover, verify) under a steady write load through HAProxy."""
    airflow, topo = observed_airflow, topology
    topo.up()
    topo.seed_database(rows=2000)
    topo.reset_aws()
    topo.seed_aws()
    topo.haproxy.reset_weights()
    airflow.wait_for_dag(UPGRADE)
    airflow.wait_for_dag("pgactive_upgrade_rollback")
    forget_earlier_upgrades(airflow)
    conf = {**demo_conf(topo), "shift_percentages": [25, 50, 75, 100], "phase_settle_seconds": 1,
            "decommission": "keep"}
    dsn = f"host=127.0.0.1 port={topo.haproxy.write_port} dbname=app user=app password={topo.credentials['app']}"
    started = time.monotonic()
    with Churn(dsn, rate=100) as churn:
        run_id = airflow.trigger(UPGRADE, conf)
        state = airflow.wait_for_run(UPGRADE, run_id, timeout=420)
    assert state == "success", states_of(airflow, UPGRADE, run_id)
    time.sleep(3)  # the last metric exports (every second) and span batches
    record = json.loads(airflow.api("GET", "variables/pgactive_upgrade__orders-db")["value"])
    return {"run_id": run_id, "record": record, "seconds": time.monotonic() - started,
            "writes": churn.committed, "write_errors": churn.errors}
