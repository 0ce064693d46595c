import json

import pytest

from pgactive_upgrade.traffic import Route, Route53Controller, TrafficError, build_controller

SOURCE_HOST, TARGET_HOST = "old-db.abc123.us-east-1.rds.amazonaws.com", "new-db.abc123.us-east-1.rds.amazonaws.com"


def controller_for(route53, zone_id, names, ttl=5) -> Route53Controller:
    settings = {"controller": "route53", "route53": {
        "hosted_zone_id": zone_id, "ttl": ttl, "routes": [{"name": n, "carries_writes": True} for n in names],
        "source_set_identifier": "source", "target_set_identifier": "target"}}
    return build_controller(settings, source_endpoint=(SOURCE_HOST, 5432), target_endpoint=(TARGET_HOST, 5432),
                            route53_client=route53)


def weighted_records(route53, zone_id, name) -> dict[str, tuple[int, str, int]]:
    """SetIdentifier -> (weight, value, ttl), read straight from Route 53."""
    records = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return {r["SetIdentifier"]: (r["Weight"], r["ResourceRecords"][0]["Value"], r["TTL"])
            for r in records if r["Name"] == name.rstrip(".") + "." and r["Type"] == "CNAME"}


@pytest.fixture
def change_calls(route53):
    """Every ChangeResourceRecordSets request the client sends, as its parameters (botocore's event hooks)."""
    calls = []
    route53.meta.events.register("provide-client-params.route53.ChangeResourceRecordSets",
                                 lambda params, **_: calls.append(params))
    return calls


def test_first_call_creates_both_weighted_records(route53, hosted_zone):
    zone_id, zone = hosted_zone
    writer = f"writer.{zone}"
    controller = controller_for(route53, zone_id, [writer])
    assert controller.set_target_percent(0) == {writer: 0}
    assert weighted_records(route53, zone_id, writer) == {"source": (100, SOURCE_HOST, 5), "target": (0, TARGET_HOST, 5)}


@pytest.mark.parametrize("percent", [0, 30, 100])
def test_sets_and_reads_back(route53, hosted_zone, percent):
    zone_id, zone = hosted_zone
    writer, reader = f"writer.{zone}", f"reader.{zone}."
    controller = controller_for(route53, zone_id, [writer, reader])
    assert controller.set_target_percent(percent) == {writer: percent, reader: percent}
    assert controller.read_split() == {writer: percent, reader: percent}
    for name in (writer, reader):
        records = weighted_records(route53, zone_id, name)
        assert (records["source"][0], records["target"][0]) == (100 - percent, percent)


def test_all_records_change_in_one_batch(route53, hosted_zone, change_calls):
    zone_id, zone = hosted_zone
    names = [f"writer.{zone}", f"reader.{zone}"]
    controller = controller_for(route53, zone_id, names)
    controller.set_target_percent(30)
    assert len(change_calls) == 1
    changes = change_calls[0]["ChangeBatch"]["Changes"]
    assert sorted((c["Action"], c["ResourceRecordSet"]["Name"], c["ResourceRecordSet"]["SetIdentifier"],
                   c["ResourceRecordSet"]["Weight"]) for c in changes) == sorted(
        ("UPSERT", n + ".", ident, w) for n in names for ident, w in (("source", 70), ("target", 30)))
    assert route53.get_change(Id=controller.last_change_id)["ChangeInfo"]["Status"] == "INSYNC"


def test_ttl_from_settings_on_both_records(route53, hosted_zone):
    zone_id, zone = hosted_zone
    writer = f"writer.{zone}"
    controller_for(route53, zone_id, [writer], ttl=60).set_target_percent(10)
    assert {ttl for _, _, ttl in weighted_records(route53, zone_id, writer).values()} == {60}


def test_second_call_is_idempotent(route53, hosted_zone):
    zone_id, zone = hosted_zone
    writer = f"writer.{zone}"
    controller = controller_for(route53, zone_id, [writer])
    first = controller.set_target_percent(30)
    records = weighted_records(route53, zone_id, writer)
    assert controller.set_target_percent(30) == first == {writer: 30}
    assert weighted_records(route53, zone_id, writer) == records
    assert len(records) == 2


def test_only_named_routes_change(route53, hosted_zone):
    zone_id, zone = hosted_zone
    writer, reader = f"writer.{zone}", f"reader.{zone}"
    controller = controller_for(route53, zone_id, [writer, reader])
    controller.set_target_percent(0)
    assert controller.set_target_percent(40, [reader.upper() + "."]) == {writer: 0, reader: 40}


def test_validation_errors_send_nothing(route53, hosted_zone, change_calls):
    zone_id, zone = hosted_zone
    controller = controller_for(route53, zone_id, [f"writer.{zone}"])
    with pytest.raises(ValueError, match=r"unknown traffic routes \['nope.example'\]"):
        controller.set_target_percent(10, ["nope.example"])
    for bad in (-5, 101, 12.5, False):
        with pytest.raises(ValueError, match="percent"):
            controller.set_target_percent(bad)
    assert change_calls == []


def test_paginates_through_a_busy_zone(route53, hosted_zone):
    zone_id, zone = hosted_zone
    names = [f"writer.{zone}", f"reader.{zone}"]
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
        {"Action": "CREATE", "ResourceRecordSet": {"Name": f"{prefix}.{zone}", "Type": "A", "TTL": 60,
                                                   "ResourceRecords": [{"Value": "10.0.0.1"}]}}
        for prefix in ("reader", "writer", "a", "zzz", "reader2", "writer-old")]})
    controller = controller_for(route53, zone_id, names)
    controller.page_size = 2  # each route's pair fills a page, the end of the name is found on the next one
    pages = []
    route53.meta.events.register("provide-client-params.route53.ListResourceRecordSets",
                                 lambda params, **_: pages.append(params))
    assert controller.set_target_percent(30) == {names[0]: 30, names[1]: 30}
    followed_cursor = [p["StartRecordName"] for p in pages if p["StartRecordName"] not in {n + "." for n in names}]
    assert followed_cursor, pages


def test_pagination_that_does_not_advance_is_an_error(route53, hosted_zone):
    # moto omits NextRecordIdentifier inside a weighted group, so its cursor repeats: we must not loop forever.
    zone_id, zone = hosted_zone
    controller = controller_for(route53, zone_id, [f"writer.{zone}"])
    controller.set_target_percent(30)
    controller.page_size = 1
    with pytest.raises(TrafficError, match="does not advance"):
        controller.read_split()


def test_replaces_a_plain_cname_in_the_same_batch(route53, hosted_zone, change_calls):
    zone_id, zone = hosted_zone
    writer = f"writer.{zone}"
    route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
        {"Action": "CREATE", "ResourceRecordSet": {"Name": writer, "Type": "CNAME", "TTL": 300,
                                                   "ResourceRecords": [{"Value": SOURCE_HOST}]}}]})
    controller = controller_for(route53, zone_id, [writer])
    assert controller.read_split() == {writer: 0}
    assert controller.set_target_percent(0) == {writer: 0}
    assert [c["Action"] for c in change_calls[-1]["ChangeBatch"]["Changes"]] == ["DELETE", "UPSERT", "UPSERT"]
    assert weighted_records(route53, zone_id, writer) == {"source": (100, SOURCE_HOST, 5), "target": (0, TARGET_HOST, 5)}


def test_missing_records_and_bad_zone_are_traffic_errors(route53, hosted_zone):
    zone_id, zone = hosted_zone
    controller = controller_for(route53, zone_id, [f"writer.{zone}"])
    with pytest.raises(TrafficError, match="no records.*both 0"):
        controller.read_split()
    lost = Route53Controller(route53, "ZNOSUCHZONE", [Route("writer.example")], SOURCE_HOST, TARGET_HOST)
    with pytest.raises(TrafficError, match="ZNOSUCHZONE"):
        lost.set_target_percent(10)


def test_build_controller_errors_and_describe(route53, hosted_zone):
    zone_id, zone = hosted_zone
    with pytest.raises(ValueError, match="route53 client"):
        build_controller({"controller": "route53", "route53": {"hosted_zone_id": zone_id, "routes": []}},
                         source_endpoint=(SOURCE_HOST, 5432), target_endpoint=(TARGET_HOST, 5432))
    with pytest.raises(ValueError, match="unknown traffic controller 'nginx'"):
        build_controller({"controller": "nginx"}, source_endpoint=("a", 1), target_endpoint=("b", 2))
    summary = controller_for(route53, zone_id, [f"writer.{zone}"]).describe()
    assert json.loads(json.dumps(summary))["target_host"] == TARGET_HOST
