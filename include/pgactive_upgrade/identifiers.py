"""RDS names in one place: the naming rules, ARNs, the case-insensitive source key, derived names."""

from __future__ import annotations

import re

IDENTIFIER_MAX = 63


class IdentifierError(ValueError):
    """A name breaks the RDS naming rules or an ARN is not a DB instance ARN."""


def validate_identifier(value: str, *, kind: str = "DB instance identifier", max_len: int = IDENTIFIER_MAX) -> str:
    """RDS rules: ASCII letters, digits, hyphens; starts with a letter; no '--'; no trailing hyphen."""
    problems = []
    if not value or len(value) > max_len:
        problems.append(f"must be 1-{max_len} characters")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", value or ""):
        problems.append("must start with a letter and contain only ASCII letters, digits and hyphens")
    if "--" in (value or "") or (value or "").endswith("-"):
        problems.append("must not contain '--' or end with a hyphen")
    if problems:
        raise IdentifierError(f"invalid {kind} {value!r}: " + "; ".join(problems))
    return value


def identifier_from(identifier_or_arn: str) -> str:
    """'arn:aws:rds:us-east-1:123:db:orders-db' -> 'orders-db'; a plain identifier is returned as is."""
    if identifier_or_arn.startswith("arn:"):
        parts = identifier_or_arn.split(":")
        if len(parts) != 7 or parts[2] != "rds" or parts[5] != "db":
            raise IdentifierError(f"{identifier_or_arn!r} is not an RDS DB instance ARN "
                                  "(arn:aws:rds:<region>:<account>:db:<id>)")
        return parts[6]
    return identifier_or_arn


def source_key(identifier_or_arn: str) -> str:
    """The canonical key of a source: RDS identifiers are case-insensitive (ARN or name, any case)."""
    return identifier_or_arn.rsplit(":", 1)[-1].lower()


def target_identifier(source_id: str, target_major: int) -> str:
    """'orders-db' -> 'orders-db-pg17'; 'orders-db-pg15' -> 'orders-db-pg17'; truncated to 63 chars."""
    base = re.sub(r"-pg\d+$", "", identifier_from(source_id))
    suffix = f"-pg{target_major}"
    base = base[: IDENTIFIER_MAX - len(suffix)].rstrip("-")
    return validate_identifier(base + suffix)


def slug(text: str) -> str:
    """A lower-case PostgreSQL name fragment derived from an RDS identifier, stable across runs."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]
