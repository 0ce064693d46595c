"""The conf schema as Airflow Params: the trigger form, and validation at trigger time."""

from __future__ import annotations

from airflow.sdk import Param

from pgactive_upgrade.config import FIELDS, REQUIRED, ROLLBACK_FIELDS


def upgrade_params() -> dict[str, Param]:
    return _params(FIELDS)


def rollback_params() -> dict[str, Param]:
    return _params(ROLLBACK_FIELDS)


def _params(fields: dict[str, dict]) -> dict[str, Param]:
    params = {}
    for name, spec in fields.items():
        kwargs = dict(spec["schema"])
        if spec["default"] is not REQUIRED:
            kwargs["default"] = spec["default"]
        params[name] = Param(title=spec["title"], description=spec["description"], **kwargs)
    return params
