"""Route 53 weighted CNAME pairs (SetIdentifier source/target) through a boto3 route53 client."""
from __future__ import annotations

from collections.abc import Iterable

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from .base import Route, TrafficController, TrafficError, percent_on_target


def fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


class Route53Controller(TrafficController):
    def __init__(self, client, hosted_zone_id: str, routes: Iterable[Route], source_host: str, target_host: str,
                 ttl: int = 5, source_set_identifier: str = "source", target_set_identifier: str = "target",
                 wait_insync: bool = True, page_size: int = 100):
        super().__init__(routes)
        if source_set_identifier == target_set_identifier:
            raise ValueError("source and target set identifiers must differ")
        self.client = client
        self.hosted_zone_id = hosted_zone_id
        self.hosts = {source_set_identifier: source_host, target_set_identifier: target_host}
        self.source_id, self.target_id = source_set_identifier, target_set_identifier
        self.ttl = ttl
        self.wait_insync = wait_insync
        self.page_size = page_size
        self.last_change_id: str | None = None

    def read_split(self) -> dict[str, int]:
        return {route.name: self._percent(route) for route in self.routes}

    def describe(self) -> dict:
        return {"controller": "route53", "hosted_zone_id": self.hosted_zone_id, "ttl": self.ttl,
                "routes": self._routes_summary(), "source_set_identifier": self.source_id,
                "target_set_identifier": self.target_id, "source_host": self.hosts[self.source_id],
                "target_host": self.hosts[self.target_id], "last_change_id": self.last_change_id}

    def _apply(self, percent: int, routes: tuple[Route, ...]) -> None:
        weights = {self.source_id: 100 - percent, self.target_id: percent}
        changes = []
        for route in routes:
            # A plain CNAME cannot coexist with weighted ones: replace it inside the same atomic batch.
            changes += [{"Action": "DELETE", "ResourceRecordSet": record}
                        for record in self._records(route) if "SetIdentifier" not in record]
            changes += [self._upsert(route, identifier, weight) for identifier, weight in weights.items()]
        try:
            answer = self.client.change_resource_record_sets(
                HostedZoneId=self.hosted_zone_id,
                ChangeBatch={"Comment": f"pgactive_upgrade: {percent}% to target", "Changes": changes})
            self.last_change_id = answer["ChangeInfo"]["Id"]
            if self.wait_insync:
                self.client.get_waiter("resource_record_sets_changed").wait(
                    Id=self.last_change_id, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
        except (BotoCoreError, ClientError, WaiterError) as exc:
            raise TrafficError(f"Route 53 zone {self.hosted_zone_id}: setting {percent}% on target for "
                               f"{[r.name for r in routes]} failed: {exc}") from exc

    def _upsert(self, route: Route, identifier: str, weight: int) -> dict:
        return {"Action": "UPSERT", "ResourceRecordSet": {
            "Name": fqdn(route.name), "Type": "CNAME", "SetIdentifier": identifier, "Weight": weight,
            "TTL": self.ttl, "ResourceRecords": [{"Value": self.hosts[identifier]}]}}

    def _percent(self, route: Route) -> int:
        records = self._records(route)
        where = f"Route 53 {route.name} (read back {self._summary(records)})"
        plain = [r for r in records if "SetIdentifier" not in r]
        if plain:  # before the first shift: one plain CNAME that points at one side
            value = fqdn(plain[0]["ResourceRecords"][0]["Value"])
            sides = {fqdn(self.hosts[self.source_id]): 0, fqdn(self.hosts[self.target_id]): 100}
            if value not in sides:
                raise TrafficError(f"{where}: plain CNAME points at neither source nor target")
            return sides[value]
        weights = {r["SetIdentifier"]: int(r.get("Weight", 0)) for r in records}
        others = sum(w for identifier, w in weights.items() if identifier != self.target_id)
        return percent_on_target(others, weights.get(self.target_id, 0), where)

    def _records(self, route: Route) -> list[dict]:
        """All CNAME record sets named like the route, following list_resource_record_sets pagination."""
        name = fqdn(route.name)
        kwargs = {"HostedZoneId": self.hosted_zone_id, "StartRecordName": name, "StartRecordType": "CNAME",
                  "MaxItems": str(self.page_size)}
        records: list[dict] = []
        try:
            while True:
                page = self.client.list_resource_record_sets(**kwargs)
                for record in page["ResourceRecordSets"]:
                    if fqdn(record["Name"]) != name or record["Type"] != "CNAME":
                        return records
                    records.append(record)
                if not page.get("IsTruncated"):
                    return records
                cursor = {"StartRecordName": page["NextRecordName"], "StartRecordType": page["NextRecordType"]}
                if "NextRecordIdentifier" in page:
                    cursor["StartRecordIdentifier"] = page["NextRecordIdentifier"]
                previous = {k: kwargs.pop(k) for k in ("StartRecordName", "StartRecordType", "StartRecordIdentifier")
                            if k in kwargs}
                if cursor == previous:
                    raise TrafficError(f"Route 53 zone {self.hosted_zone_id}: listing {name} does not advance "
                                       f"past {cursor}")
                kwargs.update(cursor)
        except (BotoCoreError, ClientError) as exc:
            raise TrafficError(f"Route 53 zone {self.hosted_zone_id}: reading {name} failed: {exc}") from exc

    @staticmethod
    def _summary(records: list[dict]) -> str:
        return ", ".join(f"{r.get('SetIdentifier', '(plain)')}->{r['ResourceRecords'][0]['Value']} "
                         f"weight={r.get('Weight', '-')} ttl={r.get('TTL')}" for r in records) or "no records"

    def _key(self, name: str) -> str:
        return fqdn(name)
