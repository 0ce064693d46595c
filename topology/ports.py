from __future__ import annotations

from dataclasses import asdict, dataclass

EPHEMERAL_PORT_START = 32768


@dataclass(frozen=True)
class Ports:
    old_pg: int
    new_pg: int
    moto: int
    haproxy_write: int
    haproxy_read: int
    haproxy_runtime: int
    airflow_api: int
    redis: int  # the Celery broker of a local Airflow run with the Celery executor

    @classmethod
    def from_base(cls, base: int) -> Ports:
        ports = cls(
            old_pg=base + 15,
            new_pg=base + 17,
            moto=base + 50,
            haproxy_write=base + 60,
            haproxy_read=base + 61,
            haproxy_runtime=base + 69,
            airflow_api=base + 80,
            redis=base + 63,
        )
        too_high = {name: port for name, port in ports.as_dict().items() if not 1024 <= port < EPHEMERAL_PORT_START}
        if too_high:
            raise ValueError(f"ports must lie in 1024..{EPHEMERAL_PORT_START - 1}: {too_high}")
        return ports

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
