"""Grafana dashboards, Prometheus rules and scrape config (dashboards/) against the real metric names.

Every PromQL expression (panel targets, template-variable queries, alert rules) is tokenized and each
metric name in it must be a series of a live `/metrics` exposition: the whole stack after a small load,
every service scraped on its own port and through the gateway's union. The rules go through `promtool`
(Debian's `prometheus` package; scripts/ensure-prometheus.sh installs it): skipped where it is missing,
a failure when LLORCH_REQUIRE_PROMTOOL=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from llorch.config import load_config
from llorch_cli.supervise import SupervisorMetrics
from llorch_cli.up import SUPERVISOR_METRICS_OFFSET
from llorch_poolmgr.__main__ import addresses
from llorch_poolmgr.topology import plan_managers
from tests.support.stack import Client, Stack, mock_pool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
PROMETHEUS = ROOT / "dashboards" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
SCRAPE = PROMETHEUS / "prometheus.yml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# ------------------------------------------------------------------------------------ PromQL names


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg
    delta deriv end exp floor histogram_count histogram_fraction histogram_quantile histogram_sum
    holt_winters hour idelta increase irate label_join label_replace last_over_time ln log10 log2
    max_over_time min_over_time minute month pi predict_linear present_over_time quantile_over_time rad
    rate resets round scalar sgn sin sinh sort sort_desc sqrt start stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year"""
)
AGGREGATIONS = _words("avg bottomk count count_values group max min quantile stddev stdvar sum topk")
GROUPING = _words("by without on ignoring group_left group_right")
KEYWORDS = GROUPING | _words("and or unless atan2 bool offset")
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    |(?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    |(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token but white space; an unknown character is an error."""
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[at : at + 20]!r} in {expr!r}")
        kind = str(match.lastgroup)
        if kind != "space":
            out.append((kind, match.group()))
        at = match.end()
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, aggregations,
    keywords or label names (inside ``{...}`` and after by/without/on/ignoring/group_*), plus
    ``{__name__="..."}``. An unknown function is an error: a typo must not pass as a metric."""
    tokens = tokenize(expr)
    names: set[str] = set()
    k = 0
    while k < len(tokens):
        kind, text = tokens[k]
        following = tokens[k + 1][1] if k + 1 < len(tokens) else ""
        if text == "{":
            k = _skip_matchers(tokens, k, names)
            continue
        if kind == "ident" and text in GROUPING and following == "(":
            k = _closing(tokens, k + 1) + 1
            continue
        if kind == "ident" and text not in KEYWORDS | AGGREGATIONS and text.lower() not in ("inf", "nan"):
            if following == "(":
                if text not in FUNCTIONS:
                    raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
            else:
                names.add(text)
        k += 1
    return names


def _closing(tokens: list[tuple[str, str]], at: int) -> int:
    """Index of the bracket that closes the one at ``at``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opening, depth = tokens[at][1], 0
    for k in range(at, len(tokens)):
        if tokens[k][1] == opening:
            depth += 1
        elif tokens[k][1] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return k
    raise ValueError(f"unbalanced {opening!r}")


def _skip_matchers(tokens: list[tuple[str, str]], at: int, names: set[str]) -> int:
    end = _closing(tokens, at)
    inner = tokens[at + 1 : end]
    for k in range(len(inner) - 2):
        if inner[k][1] == "__name__" and inner[k + 1][1] == "=" and inner[k + 2][0] == "string":
            names.add(inner[k + 2][1][1:-1])
    return end + 1


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable (``label_values(expr, label)``)."""
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            yield f"{board['uid']} / {panel['title']} / {target['refId']}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        call = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", query)
        assert call is not None, f"{board['uid']} ${var['name']}: use label_values(<expr>, <label>): {query}"
        yield f"{board['uid']} ${var['name']}", call.group(1)


def rule_queries() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def all_queries() -> list[tuple[str, str]]:
    out = [q for path in DASHBOARDS for q in dashboard_queries(json.loads(path.read_text()))]
    return out + list(rule_queries())


def series_names(exposition: str) -> set[str]:
    """The series names a Prometheus server stores for an exposition: a histogram is its _bucket, _sum
    and _count, never its bare name. Families without samples yet count (their # TYPE line)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_sum", f"{name}_count"}
                names |= {f"{name}_bucket"} if kind == "histogram" else {name}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert match is not None, line
            names.add(match.group())
    return names


# ------------------------------------------------------------------------------------------ tests


def test_the_tokenizer_finds_metric_names_and_nothing_else() -> None:
    cases = {
        'sum by (le) (increase(latency_first_token_ms_bucket{pool_id="$pool"}[$__rate_interval]))': {
            "latency_first_token_ms_bucket"
        },
        "count(pool_ready == 0) or vector(0)": {"pool_ready"},
        "max by (device) (a_bytes) / on (device) group_left (x) max by (device) (b_bytes) > 0.95": {
            "a_bytes",
            "b_bytes",
        },
        'rate(x_total[5m] offset 1h30m) unless {__name__="y_total", le="+Inf"} and Inf > NaN': {
            "x_total",
            "y_total",
        },
        'label_replace(up_ish{job=~"a|b"}, "dst", "$1", "src", "(.*)")': {"up_ish"},
        "histogram_quantile(0.99, sum without (instance) (rate(h_ms_bucket[${__rate_interval}])))": {
            "h_ms_bucket"
        },
    }
    for expr, expected in cases.items():
        assert metric_names(expr) == expected, expr
    with pytest.raises(ValueError, match="unknown PromQL function 'rat'"):
        metric_names("rat(x_total[5m])")
    with pytest.raises(ValueError, match="cannot tokenize"):
        metric_names("x_total # y")


def test_dashboards_are_grafana_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["llorch-overview.json", "llorch-pool.json"]
    uids: set[str] = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        where = path.name
        assert isinstance(board["uid"], str) and 0 < len(board["uid"]) <= 40 and board["uid"] not in uids
        uids.add(board["uid"])
        assert board["title"] and isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", where
        assert variables["datasource"]["query"] == "prometheus", where
        panels = list(_panels(board["panels"]))
        assert len({p["id"] for p in panels}) == len(panels), f"{where}: panel ids repeat"
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in "hwxy"), (where, panel["title"])
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, (where, panel["title"])
            taken = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not taken & cells, f"{where}: {panel['title']} overlaps another panel"
            cells |= taken
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel["targets"], (where, panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert target["refId"] and target["expr"].strip(), (where, panel["title"])
                assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    pool = json.loads((ROOT / "dashboards" / "grafana" / "llorch-pool.json").read_text())
    assert {"pool", "set"} <= {v["name"] for v in pool["templating"]["list"]}


def test_the_scrape_config_reaches_every_service_of_each_example() -> None:
    scrape = yaml.safe_load(SCRAPE.read_text())
    assert scrape["rule_files"] == [RULES.name]
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = {name: {t for c in job["static_configs"] for t in c["targets"]} for name, job in jobs.items()}
    assert EXAMPLES
    for example in EXAMPLES:
        cfg = load_config(example, env={})
        host = cfg.grpc.scheduler.rpartition(":")[0]
        base = cfg.grpc.metrics_base_port
        assert targets["llorch-gateway"] == {cfg.api.bind}, example.name
        assert targets["llorch-scheduler"] == {f"{host}:{base}"}, example.name
        assert targets["llorch-supervisor"] == {f"{host}:{base + SUPERVISOR_METRICS_OFFSET}"}, example.name
        managers = {addresses(cfg, plan.index)[1] for plan in plan_managers(cfg, [])}
        assert managers <= targets["llorch-pool-managers"], example.name


async def test_every_queried_metric_is_served_by_a_live_stack(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(
        pools=[mock_pool("mock-gpu", devices=[0], capacity=1, args=["--token-delay-ms", "30"])],
        extra={
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [{"index": 0, "name": "Fake 12GB", "total_mib": 12288, "free_mib": 12288}],
            }
        },
    )
    await stack.start()
    client = Client(stack, http)
    done = await client.admit(max_tokens=3)
    assert (await client.events(done))[-1].event == "end"
    running = await client.admit(max_tokens=1000)
    async with contextlib.aclosing(client.follow(running)) as stream:
        async for event in stream:
            if event.event == "token":
                break
    queued = await client.admit(max_tokens=2)
    status, body, _ = await client.submit(max_tokens=2)
    assert status == 429 and body["code"] == "ADMISSION_REJECT", body
    for task_id in (queued, running):
        assert await client.cancel(task_id) == 204
    assert (await client.events(running))[-1].event == "error"

    base = int(yaml.safe_load(stack.config_path.read_text())["grpc"]["metrics_base_port"])
    union = await _get(http, f"{stack.url}/metrics")
    components = {
        "scheduler": await _get(http, f"http://127.0.0.1:{base}/metrics"),
        "pool manager 0": await _get(http, f"http://127.0.0.1:{base + 10}/metrics"),
    }
    served = series_names(union)
    for name, text in components.items():
        assert series_names(text) <= served, f"the gateway's union lacks {name}'s families"
    supervisor = generate_latest(SupervisorMetrics(CollectorRegistry()).registry).decode()
    served |= series_names(supervisor)  # `llorch up` only: the test stack has no supervisor
    queries = all_queries()
    assert len(queries) > 40
    unknown = {(where, name) for where, expr in queries for name in metric_names(expr) - served}
    assert not unknown, f"metrics no service serves: {sorted(unknown)}"

    type_lines = [line for line in union.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)), "a family appears twice in the union"
    own = series_names(union) - set().union(*(series_names(t) for t in components.values()))
    assert {"gateway_http_requests_total", "component_up", "sse_relay_lag_ms_bucket"} <= own
    keep = _gateway_keep_regex()
    assert all(keep.fullmatch(name) for name in own), sorted(n for n in own if not keep.fullmatch(n))
    others = set().union(*(series_names(t) for t in components.values())) | series_names(supervisor)
    assert not [n for n in others if keep.fullmatch(n)], "the gateway job would scrape a family twice"


def _gateway_keep_regex() -> re.Pattern[str]:
    """The gateway job keeps only the gateway's own families (the union repeats everyone else's)."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    (relabel,) = jobs["llorch-gateway"]["metric_relabel_configs"]
    assert relabel["action"] == "keep" and relabel["source_labels"] == ["__name__"]
    return re.compile(relabel["regex"])


async def _get(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, url
        return await r.text()


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    alerts = {where.removeprefix("rule ") for where, _ in rule_queries()}
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    assert set(cases) == alerts
    assert all(True in seen and False in seen for seen in cases.values()), cases


# ------------------------------------------------------------------------------------------ promtool


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is not None:
        return found
    if os.environ.get("LLORCH_REQUIRE_PROMTOOL") == "1":
        pytest.fail(
            "promtool is not installed but LLORCH_REQUIRE_PROMTOOL=1: run scripts/ensure-prometheus.sh "
            "(Debian's prometheus package) to check and unit-test dashboards/prometheus/alerts.yml"
        )
    pytest.skip("promtool is not installed (scripts/ensure-prometheus.sh installs it)")


@pytest.mark.parametrize(
    "args",
    [("check", "rules", RULES.name), ("test", "rules", RULE_TESTS.name), ("check", "config", SCRAPE.name)],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    done = subprocess.run(
        [_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
