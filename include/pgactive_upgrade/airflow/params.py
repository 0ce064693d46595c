"""The conf schema as Airflow Params: the trigger form, and validation at trigger time."""

from __future__ import annotations

import copy
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
        _copies_share_the_schema(params[name])
    return params


def _copies_share_the_schema(param: Param) -> None:
    """Airflow deep-copies the DAG's params into every operator it builds, in every task process that parses the DAG:
    39 copies of 41 params per parse of the upgrade DAG, about 50 ms of CPU per step (bench/fleet.py). Nothing
    modifies a schema, so the copies share it; each copy keeps a value of its own, as Param.resolve sets it. Still a
    plain Param (Airflow serializes only those, through value, description, schema and source), with the copy made
    through Param.__copy__. The hook is an attribute of the DAG's own Params: Param.dump() lists it, and they no longer
    pickle; Airflow 3.3 does neither with them."""

    def deepcopy(memo: dict) -> Param:
        clone = copy.copy(param)
        clone.value = copy.deepcopy(param.value, memo) if param.has_value else param.value
        return clone

    param.__deepcopy__ = deepcopy  # type: ignore[attr-defined]  # copy.deepcopy looks it up on the instance


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
