"""The monitoring files (ops/alerts.yml, ops/grafana-dashboard.json, docs/RUNBOOK.md) against
the metrics the broker really exports. No database: only files and the metrics registry."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service.core import metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "ops" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"

METRIC_NAME = re.compile(r"\bbroker_[a-z0-9_]+")
# The series a family of each type puts in the text exposition that Prometheus scrapes.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")
SEVERITIES = {"critical", "warning", "info"}


# -- what the broker exports -----------------------------------------------------------------------


def defined_families() -> dict[str, str]:
    """Every metric declared in service/core/metrics.py: family name -> type."""
    found: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase | metrics.Requests):
            for family in value.describe():
                found[family.name] = family.type
    return found


def exported_families() -> dict[str, str]:
    """Families in the exposition `/metrics` serves (labelled ones print HELP/TYPE even when
    they have no sample yet)."""
    text = prometheus_client.generate_latest().decode()
    families = {
        f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith("broker_")
    }
    # The 0.0.4 text parser reads an unlabelled histogram's `X_created` line as a gauge of its
    # own: it belongs to X.
    return {
        name: kind
        for name, kind in families.items()
        if not (name.endswith("_created") and name.removesuffix("_created") in families)
    }


def application_families() -> dict[str, str]:
    """Every metric labelled by `application`: family name -> type."""
    return {
        family.name: family.type
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase) and "application" in value._labelnames
        for family in value.describe()
    }


def application_series() -> set[str]:
    """Their series, as written in PromQL."""
    return set(series_names(application_families()))


def series_names(families: dict[str, str]) -> dict[str, str]:
    """Series name (as written in PromQL) -> the family it belongs to."""
    return {
        name + suffix: name
        for name, kind in families.items()
        for suffix in SERIES_SUFFIXES.get(kind, ("",))
    }


# -- the files -------------------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict)
    assert isinstance(document.get("groups"), list)
    assert document["groups"], "no rule groups"
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert isinstance(group.get("name"), str)
        assert group["name"]
        assert isinstance(group.get("rules"), list)
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [
        str(target.get("expr", ""))
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(str(query.get("query", "") if isinstance(query, dict) else query))
    return exprs


AGGREGATION = re.compile(
    r"\b(sum|max|min|avg|count|group|stddev|stdvar|topk|bottomk|quantile)\s*"
    r"(?:(by|without)\s*\(([^)]*)\))?\s*\("
)


def balanced(text: str, start: int) -> str:
    """The text inside the bracket opened at `start`, up to its matching close."""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1 : end]
    raise AssertionError(f"unbalanced: {text[start:]!r}")


def aggregations(expr: str) -> Iterator[tuple[str, set[str], str]]:
    """Each aggregation in `expr`: (operator, the labels it keeps by, its argument)."""
    for match in AGGREGATION.finditer(expr):
        assert match.group(2) != "without", f"`without` hides what is kept: {expr}"
        kept = {label.strip() for label in (match.group(3) or "").split(",") if label.strip()}
        yield match.group(1), kept, balanced(expr, match.end() - 1)


def uses_application_metric(expr: str) -> bool:
    return bool(set(METRIC_NAME.findall(expr)) & application_series())


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered."""
    anchors: set[str] = set()
    seen: Counter[str] = Counter()
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_fence or heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


# -- (a) the alerting rules and the runbook --------------------------------------------------------


def test_every_alert_is_complete_and_has_a_runbook_section() -> None:
    rules = load_rules()
    anchors = github_anchors(RUNBOOK.read_text())
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        name = rule.get("alert")
        assert isinstance(name, str), f"not an alerting rule: {rule}"
        assert name
        assert isinstance(rule.get("expr"), str), name
        assert rule["expr"].strip(), name
        assert DURATION.match(str(rule.get("for", ""))), f"{name}: bad or missing `for`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"
        url = str(annotations.get("runbook_url", ""))
        path, _, anchor = url.partition("#")
        assert path == "docs/RUNBOOK.md", f"{name}: runbook_url {url!r}"
        assert anchor in anchors, f"{name}: no heading in docs/RUNBOOK.md for #{anchor}"


def test_rule_expressions_are_balanced() -> None:
    """A cheap syntax check (promtool does the real one by hand): brackets and quotes pair up."""
    pairs = {")": "(", "]": "[", "}": "{"}
    for rule in load_rules():
        stack: list[str] = []
        for char in re.sub(r'"(?:[^"\\]|\\.)*"', "", rule["expr"]):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack, f"{rule['alert']}: unbalanced {char!r}"
                assert stack.pop() == pairs[char], f"{rule['alert']}: unbalanced {char!r}"
            assert char != '"', f"{rule['alert']}: unterminated string"
        assert not stack, f"{rule['alert']}: unclosed {stack}"


def test_runbook_links_between_sections_resolve() -> None:
    text = RUNBOOK.read_text()
    anchors = github_anchors(text)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"docs/RUNBOOK.md links to a missing #{anchor}"


def test_rules_on_application_metrics_fire_per_application() -> None:
    checked = set()
    for rule in load_rules():
        expr, name = rule["expr"], rule["alert"]
        if not uses_application_metric(expr):
            continue
        checked.add(name)
        found = list(aggregations(expr))
        # Unaggregated, a gauge every process exports would alert once per process.
        assert found, f"{name}: aggregates nothing"
        for operator, kept, argument in found:
            if uses_application_metric(argument):
                assert "application" in kept, f"{name}: {operator} drops `application`"
        assert "{{ $labels.application }}" in rule["annotations"]["summary"], name
    assert {
        "BrokerRefreshTransientFailures",
        "BrokerInvalidGrantRate",
        "BrokerBreakerOpen",
        "BrokerRefresherLag",
        "BrokerSellersAtRisk",
        "BrokerUpstreamSlow",
        "BrokerTokenExchangeFailures",
    } <= checked


def test_aggregation_parsing_sees_what_a_rule_drops() -> None:
    """Guards the test above: an aggregation that drops the label is caught."""
    kept = [
        (operator, labels)
        for operator, labels, argument in aggregations(
            "max(broker_breakers_open) > 0 unless on() "
            "sum by (le, application) (rate(broker_refreshes_total[5m]))"
        )
        if uses_application_metric(argument)
    ]
    assert kept == [("max", set()), ("sum", {"le", "application"})]


# -- (b) metric names ------------------------------------------------------------------------------


def test_exposition_shows_every_defined_metric() -> None:
    """The parsing below sees what service/core/metrics.py declares (guards the test itself)."""
    defined, exported = defined_families(), exported_families()
    assert defined, "no metrics found in service/core/metrics.py"
    assert defined == exported


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_only_exported_metric_names_are_used(source: str) -> None:
    if source == "alerts":
        exprs = [rule["expr"] for rule in load_rules()]
    else:
        exprs = dashboard_exprs(load_dashboard())
    valid = series_names(exported_families())
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, f"no broker_ metric in the {source}"
    unknown = sorted(used - valid.keys())
    assert not unknown, (
        f"{source} use names the broker does not export: {unknown} "
        "(counters are broker_X_total, histograms broker_X_bucket/_sum/_count)"
    )


def test_dashboard_shows_every_metric() -> None:
    valid = series_names(exported_families())
    shown = {
        valid[name]
        for expr in dashboard_exprs(load_dashboard())
        for name in METRIC_NAME.findall(expr)
        if name in valid
    }
    missing = sorted(defined_families().keys() - shown)
    assert not missing, f"ops/grafana-dashboard.json has no panel for {missing}"


# -- (c) the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    assert isinstance(dashboard.get("schemaVersion"), int)
    assert dashboard.get("title")
    assert dashboard.get("uid")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = list(all_panels(dashboard["panels"]))
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    assert any(panel["type"] == "row" for panel in panels)

    for panel in panels:
        grid = panel.get("gridPos", {})
        assert {"h", "w", "x", "y"} <= grid.keys(), f"panel {panel['id']}: gridPos"
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['id']}: wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel.get("title"), f"panel {panel['id']}: no title"
        assert panel.get("datasource", {}).get("uid") == "${datasource}", panel["title"]
        targets = panel.get("targets", [])
        assert any(str(t.get("expr", "")).strip() for t in targets), f"{panel['title']}: no expr"
        for target in targets:
            assert target.get("refId"), panel["title"]
            assert target.get("datasource", {}).get("uid") == "${datasource}", panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel.get('title')!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = str(panel.get("title"))


def test_dashboard_narrows_and_splits_by_application() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    application = variables["application"]
    assert application["type"] == "query"
    assert application["query"]["query"] == "label_values(broker_sellers, application)"
    assert application["multi"] is True
    assert application["includeAll"] is True

    valid = series_names(exported_families())
    checked = set()
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = str(target.get("expr", ""))
            for match in METRIC_NAME.finditer(expr):
                if match.group() not in application_series():
                    continue
                checked.add(valid[match.group()])
                selector = re.match(r"\{([^}]*)\}", expr[match.end() :])
                assert selector, f"{panel['title']}: {match.group()} has no selector"
                assert 'application=~"$application"' in selector.group(1), panel["title"]
            if panel["type"] == "timeseries" and uses_application_metric(expr):
                # A line per application: one failing cannot hide behind the others' average.
                for operator, kept, argument in aggregations(expr):
                    if uses_application_metric(argument):
                        assert "application" in kept, f"{panel['title']}: {operator}"
                assert "{{application}}" in target.get("legendFormat", ""), panel["title"]
    assert checked == application_families().keys()
