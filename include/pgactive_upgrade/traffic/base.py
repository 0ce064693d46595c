"""What every traffic controller offers: move a percentage of new connections to the target, read it back."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    name: str  # HAProxy backend name, or Route 53 record name (FQDN, with or without trailing dot)
    carries_writes: bool = True  # with one-way replication only read-only routes may move before cutover


class TrafficError(Exception):
    """A traffic change failed or did not read back as asked; the message says what was read back."""


def routes_from_settings(items: Iterable[dict]) -> tuple[Route, ...]:
    return tuple(Route(name=str(item["name"]), carries_writes=bool(item.get("carries_writes", True))) for item in items)


def validate_percent(percent) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError(f"percent must be an int in 0..100, got {percent!r}")
    return percent


def percent_on_target(source_weight: int, target_weight: int, where: str) -> int:
    if source_weight + target_weight <= 0:
        raise TrafficError(f"{where}: source and target weights are both 0, no traffic would be served")
    return round(100 * target_weight / (source_weight + target_weight))


class TrafficController(ABC):
    routes: tuple[Route, ...]

    def __init__(self, routes: Iterable[Route]):
        self.routes = tuple(routes)
        names = [self._key(route.name) for route in self.routes]
        if not names:
            raise ValueError("at least one traffic route is required")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate traffic route names: {[r.name for r in self.routes]}")

    def set_target_percent(self, percent: int, route_names: Sequence[str] | None = None) -> dict[str, int]:
        """Send `percent` (0..100) of new connections of the named routes (all when None) to the target; reads the
        split back and raises TrafficError if it differs; returns read_split()."""
        percent = validate_percent(percent)
        routes = self.select_routes(route_names)
        if routes:
            self._apply(percent, routes)
        split = self.read_split()
        wrong = {route.name: split[route.name] for route in routes if split[route.name] != percent}
        if wrong:
            raise TrafficError(f"asked {percent}% on target for {[r.name for r in routes]}, "
                               f"read back {wrong} (full split {split})")
        return split

    def select_routes(self, route_names: Sequence[str] | None) -> tuple[Route, ...]:
        if route_names is None:
            return self.routes
        if isinstance(route_names, str):
            route_names = [route_names]
        by_key = {self._key(route.name): route for route in self.routes}
        unknown = [name for name in route_names if self._key(name) not in by_key]
        if unknown:
            raise ValueError(f"unknown traffic routes {unknown}; known: {[r.name for r in self.routes]}")
        return tuple(dict.fromkeys(by_key[self._key(name)] for name in route_names))

    def route_names(self, carries_writes: bool | None = None) -> list[str]:
        return [r.name for r in self.routes if carries_writes is None or r.carries_writes == carries_writes]

    def switch(self, percent: int, close_sessions_of: str | None = None) -> None:
        """Every route to `percent` at once, write routes first, as fast as the controller allows, optionally
        closing sessions held to "source" or "target"; the caller reads the split back afterwards."""
        writes_first = [r.name for r in sorted(self.routes, key=lambda r: not r.carries_writes)]
        self.set_target_percent(percent, writes_first)
        if close_sessions_of == "source":
            self.close_source_sessions(writes_first)
        elif close_sessions_of == "target":
            self.close_target_sessions(writes_first)

    def close_source_sessions(self, route_names: Sequence[str] | None = None) -> list[str]:
        """Close sessions still held to the source; returns the routes where that was done. DNS-based controllers
        cannot reach established connections (pools must be recycled), so the default does nothing."""
        self.select_routes(route_names)
        return []

    def close_target_sessions(self, route_names: Sequence[str] | None = None) -> list[str]:
        """The same for sessions held to the target (after a rollback); the default does nothing."""
        self.select_routes(route_names)
        return []

    @abstractmethod
    def read_split(self) -> dict[str, int]:
        """Route name -> percent of traffic on the target, read from the live system."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-safe summary for logs (no secrets)."""

    @abstractmethod
    def _apply(self, percent: int, routes: tuple[Route, ...]) -> None:
        """Make the change on the live system; set_target_percent reads it back."""

    def _key(self, name: str) -> str:
        return name

    def _routes_summary(self) -> list[dict]:
        return [{"name": r.name, "carries_writes": r.carries_writes} for r in self.routes]
