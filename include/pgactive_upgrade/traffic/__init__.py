"""Traffic controllers: move new connections from the source database to the target, and read the split back."""
from __future__ import annotations

from .base import Route, TrafficController, TrafficError, routes_from_settings
from .haproxy import HAProxyController
from .route53 import Route53Controller

__all__ = ["Route", "TrafficController", "TrafficError", "HAProxyController", "Route53Controller", "build_controller"]


def build_controller(settings: dict, *, source_endpoint: tuple[str, int], target_endpoint: tuple[str, int],
                     route53_client=None) -> TrafficController:
    """Build the controller named by the conf's `traffic` object."""
    kind = settings.get("controller")
    if kind == "haproxy":
        cfg = settings["haproxy"]
        return HAProxyController(
            runtime_api=cfg["runtime_api"], routes=routes_from_settings(cfg["routes"]),
            source_server=cfg.get("source_server", "source"), target_server=cfg.get("target_server", "target"),
            target_address=(target_endpoint[0], target_endpoint[1]) if cfg.get("set_target_address") else None)
    if kind == "route53":
        if route53_client is None:
            raise ValueError("traffic controller route53 needs a route53 client")
        cfg = settings["route53"]
        return Route53Controller(
            route53_client, hosted_zone_id=cfg["hosted_zone_id"], routes=routes_from_settings(cfg["routes"]),
            source_host=source_endpoint[0], target_host=target_endpoint[0], ttl=int(cfg.get("ttl", 5)),
            source_set_identifier=cfg.get("source_set_identifier", "source"),
            target_set_identifier=cfg.get("target_set_identifier", "target"),
            wait_insync=bool(cfg.get("wait_insync", True)))
    raise ValueError(f"unknown traffic controller {kind!r}; expected 'haproxy' or 'route53'")
