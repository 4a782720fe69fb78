"""The metric names that the Grafana dashboard and the Prometheus alert rules use.

Shared by k8s_check.py (every name is registered in the code) and metrics_check.py (every name is
in a live /metrics scrape of the sidecar and the control plane). Needs only PyYAML.
"""

import json
import re
from pathlib import Path

DASHBOARD = Path("k8s/monitoring/dashboards/tollgate.json")
RULES = Path("k8s/monitoring/prometheusrule.yaml")

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_NAME = re.compile(r"\btollgate_[a-z0-9_]+")


def raw_metric_names(exprs):
    """Every `tollgate_*` series name as the expressions write it (a histogram's `_bucket` kept)."""
    names = set()
    for expr in exprs:
        names.update(_NAME.findall(expr))
    return names


_SELECTOR = re.compile(r"\b(tollgate_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_REGEX_META = re.compile(r"[.*+?()\[\]{}^$\\]")


def label_matchers(exprs):
    """(series name, label, operator, value) of every label matcher on a `tollgate_*` selector."""
    found = set()
    for expr in exprs:
        for name, body in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(body):
                found.add((name, label, op, value))
    return found


def literal_values(op, value):
    """The label values a matcher names literally: the value of `=`/`!=`, and the alternatives of
    a `=~`/`!~` that are plain words (`a|b`); a real pattern (`5..`) or a variable names none."""
    if "$" in value:
        return []
    if op in ("=", "!="):
        return [value]
    return [v for v in value.split("|") if v and not _REGEX_META.search(v)]


def metric_name(raw):
    """The metric family a series name belongs to: a histogram's `_bucket`/`_sum`/`_count` dropped."""
    for suffix in HISTOGRAM_SUFFIXES:
        if raw.endswith(suffix):
            return raw[: -len(suffix)]
    return raw


def metric_names(exprs):
    """The metric families the expressions use (histograms by their base name)."""
    return {metric_name(raw) for raw in raw_metric_names(exprs)}


def dashboard_exprs(dashboard):
    """(panel title, expr) of every query of a Grafana dashboard, rows' nested panels included."""
    exprs = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return exprs


def rule_exprs(rule_spec):
    """(alert or record name, expr) of every rule of a PrometheusRule's spec."""
    return [
        (r.get("alert") or r.get("record") or "?", r["expr"])
        for g in rule_spec.get("groups", [])
        for r in g.get("rules", [])
        if r.get("expr")
    ]


def load_dashboard(path):
    return json.loads(Path(path).read_text())


def load_rule_spec(path):
    """The spec of the PrometheusRule in a manifest file."""
    import yaml

    for doc in yaml.safe_load_all(Path(path).read_text()):
        if doc and doc.get("kind") == "PrometheusRule":
            return doc["spec"]
    raise LookupError(f"no PrometheusRule in {path}")
