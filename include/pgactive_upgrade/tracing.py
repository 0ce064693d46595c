"""Spans for the steps inside a task (the fenced switch's fence, catch-up, sequences, switch) through the
OpenTelemetry API. Under Airflow with `[traces] otel_on` they nest under the task's own span; with tracing off
(no tracer provider set) they cost nothing."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

try:
    from opentelemetry import trace
except ImportError:  # the package does not need OpenTelemetry to run
    trace = None  # type: ignore[assignment]

TRACER_NAME = "pgactive_upgrade"


@contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    if trace is None:
        yield
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
            f"{TRACER_NAME}.{name}", attributes={k: v for k, v in attributes.items() if v is not None}):
        yield
