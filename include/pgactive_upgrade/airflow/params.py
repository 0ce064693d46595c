"""The conf schema as Airflow Params: the trigger form, and validation at trigger time."""

from __future__ import annotations

import json

from airflow.sdk import Param

from pgactive_upgrade.config import FIELDS, REQUIRED, ROLLBACK_FIELDS


def upgrade_params() -> dict[str, Param]:
    return _params(FIELDS)


def rollback_params() -> dict[str, Param]:
    return _params(ROLLBACK_FIELDS)


def _params(fields: dict[str, dict]) -> dict[str, Param]:
    params = {}
    for name, spec in fields.items():
        labels = {"title": spec["title"], "description": _description(spec), "section": spec["section"]}
        if spec["default"] is REQUIRED:
            params[name] = Param(**spec["schema"], **labels)
        else:
            params[name] = Param(spec["default"], **_nullable(spec["schema"]), **labels)
    return params


def _description(spec: dict) -> str:
    if spec["example"] is None:
        return spec["description"]
    return f"{spec['description']} Example: {json.dumps(spec['example'])}"


def _nullable(schema: dict) -> dict:
    """The form marks a field required unless its type admits null; validation then treats null as the default."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    nullable = {**schema, "type": types if "null" in types else [*types, "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable
