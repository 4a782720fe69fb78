"""Checks of k8s/ (run by tests/e2e/70-k8s.sh, which provides the tools).

Renders both overlays with kustomize, validates every rendered object against the Kubernetes JSON
schemas (kubernetes-validate, strict) or, for the Prometheus Operator kinds, against the schemas
in tests/e2e/k8s-schemas/, then checks what the manifests promise: security settings, probes,
graceful termination, what the Services and Ingresses expose, who the NetworkPolicies let reach
Redis and PostgreSQL, the alert rules (promtool check + unit tests) and the dashboard (JSON,
PromQL, and that every metric it uses exists in the code).

Prints one PASS/FAIL line per check and ends with `k8s: N passed, M failed`.
"""

import argparse
import copy
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv

from monitoring_names import dashboard_exprs, metric_names

# The oldest Kubernetes the manifests support (preStop `sleep` is on by default from 1.30) and the
# newest the schemas know: a field removed or renamed upstream fails here before a user meets it.
MIN_KUBERNETES = "1.30.0"

OVERLAYS = ["dev", "prod"]

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CP_LABELS = {"app.kubernetes.io/name": "tollgate-control-plane"}
CP_SERVER_LABELS = {**CP_LABELS, "app.kubernetes.io/component": "server"}
SIDECAR_LABEL = ("tollgate/sidecar", "true")
SIDECAR_ADMIN_PORT = 9090


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, name, detail=""):
        self.passed += 1
        print(f"PASS {name}{': ' + detail if detail else ''}")

    def fail(self, name, detail):
        self.failed += 1
        print(f"FAIL {name}: {detail}")

    def check(self, name, problems, detail=""):
        """`problems`: a list of strings; empty means the check passed."""
        if problems:
            self.fail(name, "; ".join(problems))
        else:
            self.ok(name, detail)

    @staticmethod
    def note(text):
        print(f"NOTE {text}")


# --- rendering and schemas ------------------------------------------------------------------


def render(kustomize, directory):
    proc = subprocess.run(kustomize + [str(directory)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"exit {proc.returncode}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def load_crd_schemas(folder):
    schemas = {}
    for path in sorted(Path(folder).glob("*.json")):
        schema = json.loads(path.read_text())
        kind = schema["properties"]["kind"]["const"]
        api = schema["properties"]["apiVersion"]["const"]
        schemas[(api, kind)] = schema
    return schemas


def schema_problems(doc, versions, crd_schemas):
    """Every reason `doc` is not a valid object; [] when it is."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crd_schemas:
        validator = jsonschema.Draft202012Validator(crd_schemas[key])
        return [
            f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        ]
    problems = []
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            problems.append(f"k8s {e.version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            # Never skipped silently: an unknown kind needs a schema in tests/e2e/k8s-schemas/.
            problems.append(e.message)
    return problems


def name_of(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --- helpers over rendered objects ----------------------------------------------------------


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    if len(found) != 1:
        raise LookupError(f"expected one {kind}/{name}, found {len(found)}")
    return found[0]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def container(spec, name):
    for c in all_containers(spec):
        if c["name"] == name:
            return c
    raise LookupError(f"no container {name}")


def env_value(c, name):
    for e in c.get("env", []):
        if e["name"] == name:
            return e.get("value", e.get("valueFrom"))
    return None


def duration_seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a duration: {text}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def prestop_sleep(c):
    return c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)


def configmap_data(docs, name_prefix):
    """The data of the (hash-suffixed) ConfigMap generated as `name_prefix`."""
    found = [
        d for d in find(docs, "ConfigMap")
        if re.fullmatch(re.escape(name_prefix) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])
    ]
    if len(found) != 1:
        raise LookupError(f"expected one ConfigMap {name_prefix}, found {len(found)}")
    return found[0].get("data", {})


# --- security and workload checks -----------------------------------------------------------


def security_problems(workload):
    spec = pod_spec(workload)
    sc = spec.get("securityContext", {})
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append("uses a host namespace")
    for c in all_containers(spec):
        csc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if not (csc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True):
            problems.append(f"{where}: runAsNonRoot is not true")
        if csc.get("runAsUser", sc.get("runAsUser")) in (None, 0):
            problems.append(f"{where}: no numeric non-root runAsUser")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if csc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: adds capabilities")
        if csc.get("privileged"):
            problems.append(f"{where}: privileged")
        res = c.get("resources", {})
        for need in ("cpu", "memory"):
            if need not in res.get("requests", {}):
                problems.append(f"{where}: no {need} request")
        if "memory" not in res.get("limits", {}):
            problems.append(f"{where}: no memory limit")
        # A probe's named port resolves among its own container's ports only.
        own_ports = {p["name"] for p in c.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            action = c.get(probe, {})
            port = (action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
            if isinstance(port, str) and port not in own_ports:
                problems.append(f"{where}: {probe} names port {port}, which the container does not declare")
        image = c.get("image", "")
        if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
            problems.append(f"{where}: image {image!r} has no fixed tag")
    return problems


def control_plane_problems(docs):
    problems = []
    dep = one(docs, "Deployment", "tollgate-control-plane")
    spec = pod_spec(dep)
    if dep["spec"].get("replicas") != 2:
        problems.append(f"replicas is {dep['spec'].get('replicas')}, not 2")
    strategy = dep["spec"].get("strategy", {})
    if strategy.get("type") != "RollingUpdate" or strategy.get("rollingUpdate", {}).get("maxUnavailable") != 0:
        problems.append("not a RollingUpdate with maxUnavailable 0")
    cp = container(spec, "control-plane")
    if cp.get("args") != ["serve"]:
        problems.append(f"args {cp.get('args')}, not [serve]")
    if cp.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("liveness probe is not GET /healthz")
    if cp.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readiness probe is not GET /readyz")
    for var in ("DATABASE_URL", "REDIS_URL"):
        source = env_value(cp, var)
        if not isinstance(source, dict) or source.get("secretKeyRef", {}).get("key") != var:
            problems.append(f"{var} does not come from a Secret")
    config = configmap_data(docs, "tollgate-control-plane")
    if config.get("TOLLGATE_LOG_FORMAT") != "json":
        problems.append("TOLLGATE_LOG_FORMAT is not json")
    if not config.get("TOLLGATE_LISTEN", "").startswith("0.0.0.0:"):
        problems.append("TOLLGATE_LISTEN does not listen on the pod address")
    # /internal/ has a listener of its own (issue 13), on a declared port named `internal`.
    internal_listen = config.get("TOLLGATE_INTERNAL_LISTEN", "")
    cp_ports = {p["name"]: p["containerPort"] for p in cp.get("ports", [])}
    if not internal_listen.startswith("0.0.0.0:") or cp_ports.get("internal") != int(internal_listen.rsplit(":", 1)[-1] or 0):
        problems.append("TOLLGATE_INTERNAL_LISTEN is not the pod address on the port named internal")
    if internal_listen and internal_listen == config.get("TOLLGATE_LISTEN"):
        problems.append("the internal listener is the public one")
    keys_dir = config.get("TOLLGATE_JWT_KEYS_DIR")
    mounts = {m["mountPath"]: m["name"] for m in cp.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if not keys_dir or keys_dir not in mounts or "secret" not in volumes.get(mounts[keys_dir], {}):
        problems.append("TOLLGATE_JWT_KEYS_DIR is not a mounted Secret")
    grace = duration_seconds(config.get("TOLLGATE_SHUTDOWN_GRACE", "20s"))
    if spec.get("terminationGracePeriodSeconds", 30) < prestop_sleep(cp) + grace + 5:
        problems.append("terminationGracePeriodSeconds shorter than preStop + TOLLGATE_SHUTDOWN_GRACE + 5s")
    if not any(c.get("args") == ["migrate"] for c in spec.get("initContainers", [])):
        problems.append("no migrate init container")

    job = one(docs, "Job", "tollgate-migrate")
    job_args = [c.get("args") for c in all_containers(pod_spec(job))]
    if job_args[:1] != [["migrate"]] or ["seed"] not in job_args:
        problems.append(f"migration Job runs {job_args}, not migrate then seed")
    # A Job's template is immutable; a generated ConfigMap's name changes with its content, so a
    # reference to one would make the next `kubectl apply` after a settings change fail.
    if "configMap" in json.dumps(pod_spec(job)):
        problems.append("the migration Job references a ConfigMap (its template would change with every setting)")

    svc = one(docs, "Service", "tollgate-control-plane")
    if svc["spec"]["selector"] != CP_SERVER_LABELS:
        problems.append("Service selector is not the serving pods' (the Job's pods must not get traffic)")
    hpa = one(docs, "HorizontalPodAutoscaler", "tollgate-control-plane")
    if hpa["spec"]["scaleTargetRef"].get("name") != "tollgate-control-plane" or hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("HPA does not target the Deployment with at least 2 replicas")
    pdb = one(docs, "PodDisruptionBudget", "tollgate-control-plane")
    if pdb["spec"]["selector"].get("matchLabels") != CP_SERVER_LABELS:
        problems.append("PDB does not select the serving pods")
    return problems


def sidecar_app_problems(docs, repo):
    """The demo app with its sidecar: loopback app, routes file, admin port, termination."""
    problems = []
    dep = one(docs, "Deployment", "idoctor")
    spec = pod_spec(dep)
    if pod_labels(dep).get(SIDECAR_LABEL[0]) != SIDECAR_LABEL[1]:
        problems.append("pods lack the tollgate/sidecar label")
    app = container(spec, "idoctor")
    sidecar = container(spec, "tollgate-sidecar")
    if not str(env_value(app, "IDOCTOR_LISTEN") or "").startswith("127.0.0.1:"):
        problems.append("the app does not listen on loopback only")
    if app.get("ports"):
        problems.append("the app container declares ports")
    upstream = env_value(sidecar, "TOLLGATE_SIDECAR_UPSTREAM")
    if upstream != "http://127.0.0.1:" + str(env_value(app, "IDOCTOR_LISTEN")).split(":")[-1]:
        problems.append(f"sidecar upstream {upstream} is not the app's loopback address")
    admin = env_value(sidecar, "TOLLGATE_SIDECAR_ADMIN_LISTEN") or ""
    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    if ports.get("tollgate-admin") != SIDECAR_ADMIN_PORT or not admin.endswith(f":{SIDECAR_ADMIN_PORT}"):
        problems.append("sidecar admin port is not 9090 named tollgate-admin")
    for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/readyz")):
        get = sidecar.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "tollgate-admin":
            problems.append(f"sidecar {probe} is not {path} on the admin port")
    # Redis is shared by all replicas: readiness that follows it would empty the Service during
    # an outage and defeat fail-open and the public routes.
    if sidecar.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz":
        problems.append("sidecar readiness follows Redis (/readyz)")
    # A probe's named port resolves among its own container's ports only, and the app has none.
    app_ready = app.get("readinessProbe", {}).get("httpGet", {})
    proxy_port = ports.get("http")
    if app_ready.get("port") != proxy_port or not app_ready.get("path"):
        problems.append("the app's readiness is not asked by number through the sidecar's proxy port")
    if env_value(sidecar, "TOLLGATE_SIDECAR_FAIL_MODE") not in ("closed", "open"):
        problems.append("TOLLGATE_SIDECAR_FAIL_MODE not set")
    cp_url = env_value(sidecar, "TOLLGATE_SIDECAR_CONTROL_PLANE_URL") or ""
    if not re.fullmatch(r"http://tollgate-control-plane\.[a-z0-9-]+\.svc(\.cluster\.local)?(:\d+)?", cp_url):
        problems.append(f"control plane URL {cp_url!r} is not the in-cluster Service")
    internal_url = env_value(sidecar, "TOLLGATE_SIDECAR_CONTROL_PLANE_INTERNAL_URL") or ""
    if not re.fullmatch(r"http://tollgate-control-plane\.[a-z0-9-]+\.svc(\.cluster\.local)?:9002", internal_url):
        problems.append(f"control plane internal URL {internal_url!r} is not the Service's internal port")

    # Graceful termination: the sidecar drains for TOLLGATE_SHUTDOWN_GRACE after its preStop
    # pause; the app must still be there until then, and the pod's grace period must cover both.
    sidecar_grace = duration_seconds(env_value(sidecar, "TOLLGATE_SHUTDOWN_GRACE") or "20s")
    upstream_timeout = duration_seconds(env_value(sidecar, "TOLLGATE_SIDECAR_UPSTREAM_TIMEOUT") or "60s")
    drained_at = prestop_sleep(sidecar) + sidecar_grace
    period = spec.get("terminationGracePeriodSeconds", 30)
    if sidecar_grace < upstream_timeout:
        problems.append("sidecar shutdown grace is shorter than its upstream timeout")
    if prestop_sleep(app) < drained_at:
        problems.append("the app may stop before the sidecar has drained")
    if period < max(drained_at, prestop_sleep(app)) + 5:
        problems.append(f"terminationGracePeriodSeconds {period} is too short")

    # The routes file is demo/idoctor/routes.yaml with the app on the pod's loopback.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    routes_path = env_value(sidecar, "TOLLGATE_SIDECAR_ROUTES") or ""
    mount = next((m for m in sidecar.get("volumeMounts", []) if routes_path.startswith(m["mountPath"] + "/")), None)
    cm_name = volumes.get(mount["name"], {}).get("configMap", {}).get("name") if mount else None
    if not cm_name:
        problems.append("the routes file is not mounted from a ConfigMap")
    else:
        data = one(docs, "ConfigMap", cm_name).get("data", {})
        mounted = yaml.safe_load(data.get(os.path.basename(routes_path), "") or "null")
        demo = yaml.safe_load((repo / "demo/idoctor/routes.yaml").read_text())
        if not isinstance(mounted, dict):
            problems.append("the routes ConfigMap has no routes file at TOLLGATE_SIDECAR_ROUTES")
        else:
            if mounted.get("upstream") != "http://127.0.0.1:4200":
                problems.append("the routes file's upstream is not http://127.0.0.1:4200")
            mounted.pop("upstream", None)
            demo.pop("upstream", None)
            if mounted != demo:
                problems.append("the routes ConfigMap differs from demo/idoctor/routes.yaml")
    return problems


def exposure_problems(docs):
    """The sidecar admin port is in no Service; the Ingress routes only /v1, /.well-known, /checkout and /account to
    the control plane (never /internal)."""
    problems = []
    admin_names = {"tollgate-admin"}
    for svc in find(docs, "Service"):
        for p in svc["spec"].get("ports", []):
            if p.get("port") == SIDECAR_ADMIN_PORT or p.get("targetPort") in admin_names | {SIDECAR_ADMIN_PORT}:
                problems.append(f"Service/{svc['metadata']['name']} exposes the sidecar admin port")
    public = []
    for ing in find(docs, "Ingress"):
        default = ing["spec"].get("defaultBackend", {}).get("service", {}).get("name")
        if default == "tollgate-control-plane":
            problems.append(f"Ingress/{ing['metadata']['name']} sends everything to the control plane")
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                if path["backend"].get("service", {}).get("name") != "tollgate-control-plane":
                    continue
                p = path.get("path", "/")
                public.append(p)
                port = path["backend"]["service"].get("port", {})
                if port not in ({"name": "http"}, {"number": 80}):
                    problems.append(f"Ingress/{ing['metadata']['name']} routes {p} to port {port}, not http")
                allowed = p.rstrip("/") in ("/v1", "/.well-known", "/checkout", "/account") or p.startswith(("/v1/", "/.well-known/"))
                if not allowed or path.get("pathType") == "ImplementationSpecific":
                    problems.append(f"Ingress/{ing['metadata']['name']} routes {p} ({path.get('pathType')}) to the control plane")
    if not public:
        problems.append("no Ingress routes the public API")
    return problems


# --- NetworkPolicy evaluation ---------------------------------------------------------------


def selector_matches(selector, labels):
    if selector is None:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def port_matches(rule_ports, port_number, port_name):
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p or p["port"] in (port_number, port_name):
            return True
    return False


def peer_matches_pod(peer, pod, policy_ns):
    """Does a NetworkPolicy peer (podSelector / namespaceSelector) select this pod?"""
    if "ipBlock" in peer:
        return False
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:
        if pod["namespace"] != policy_ns:
            return False
    elif not selector_matches(ns_sel, {"kubernetes.io/metadata.name": pod["namespace"]}):
        return False
    return selector_matches(peer.get("podSelector", {}), pod["labels"])


def ingress_allowed(policies, source, target, port_number, port_name):
    """May `source` open a TCP connection to `target` on that port (ingress side only)?"""
    selecting = [
        p for p in policies
        if p["metadata"].get("namespace") == target["namespace"]
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"].get("podSelector", {}), target["labels"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if not port_matches(rule.get("ports"), port_number, port_name):
                continue
            peers = rule.get("from")
            if not peers or any(peer_matches_pod(peer, source, policy["metadata"]["namespace"]) for peer in peers):
                return True
    return False


def egress_allowed_ip(policies, source, address, port_number):
    """May `source` connect out to an address outside the cluster on that port?"""
    selecting = [
        p for p in policies
        if p["metadata"].get("namespace") == source["namespace"]
        and "Egress" in p["spec"].get("policyTypes", [])
        and selector_matches(p["spec"].get("podSelector", {}), source["labels"])
    ]
    if not selecting:
        return True
    ip = ipaddress.ip_address(address)
    for policy in selecting:
        for rule in policy["spec"].get("egress", []):
            if not port_matches(rule.get("ports"), port_number, None):
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for peer in peers:
                block = peer.get("ipBlock")
                if block and ip in ipaddress.ip_network(block["cidr"]) and not any(
                    ip in ipaddress.ip_network(e) for e in block.get("except", [])
                ):
                    return True
    return False


def pods_of(docs, namespace):
    """Every pod template of the rendered objects, plus pods that are none of ours: one in the
    same namespace and one elsewhere, each with and without misleading labels removed."""
    pods = []
    for w in docs:
        if w["kind"] in WORKLOAD_KINDS:
            pods.append({"name": name_of(w), "namespace": w["metadata"].get("namespace", namespace), "labels": pod_labels(w)})
    pods.append({"name": "stranger in namespace", "namespace": namespace, "labels": {"app": "other"}})
    pods.append({"name": "stranger elsewhere", "namespace": "elsewhere", "labels": {"app": "other"}})
    pods.append({"name": "app with a sidecar elsewhere", "namespace": "shop", "labels": {SIDECAR_LABEL[0]: SIDECAR_LABEL[1]}})
    return pods


def is_control_plane(pod, server_only):
    labels = CP_SERVER_LABELS if server_only else CP_LABELS
    return all(pod["labels"].get(k) == v for k, v in labels.items())


def has_sidecar(pod):
    return pod["labels"].get(SIDECAR_LABEL[0]) == SIDECAR_LABEL[1]


def network_problems(docs, overlay):
    problems = []
    policies = find(docs, "NetworkPolicy")
    namespace = "tollgate"
    if not any(p["metadata"]["name"] == "default-deny-ingress" and p["spec"].get("podSelector") == {} for p in policies):
        problems.append("no default-deny-ingress policy")
    pods = pods_of(docs, namespace)

    # Who may reach Redis: control plane (serving) and sidecars. PostgreSQL: control plane only
    # (serving pods and the migration Job).
    may_reach_redis = lambda pod: is_control_plane(pod, server_only=True) or has_sidecar(pod)  # noqa: E731
    may_reach_postgres = lambda pod: is_control_plane(pod, server_only=False)  # noqa: E731

    stores = {
        "redis": (6379, "redis", may_reach_redis),
        "postgres": (5432, "postgres", may_reach_postgres),
    }
    statefulsets = {w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name"): w for w in find(docs, "StatefulSet")}
    for store, (port, port_name, should) in stores.items():
        if store in statefulsets:
            target = {"namespace": namespace, "labels": pod_labels(statefulsets[store])}
            for pod in pods:
                allowed = ingress_allowed(policies, pod, target, port, port_name)
                if allowed != should(pod):
                    problems.append(f"{pod['name']} {'can' if allowed else 'cannot'} reach {store}")
        else:
            # External store: this namespace's egress policies are what stands in the way. The
            # store's address range is the one the control plane may reach on the store's port.
            cidrs = {
                peer["ipBlock"]["cidr"]
                for policy in policies if "Egress" in policy["spec"].get("policyTypes", [])
                and selector_matches(policy["spec"].get("podSelector", {}), CP_SERVER_LABELS)
                for rule in policy["spec"].get("egress", [])
                if rule.get("ports") and port_matches(rule["ports"], port, None)
                for peer in rule.get("to", []) if "ipBlock" in peer
                and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen > 0
            }
            if not cidrs:
                problems.append(f"{overlay}: no egress rule names the external {store}'s address range")
                continue
            for cidr in sorted(cidrs):
                address = str(next(ipaddress.ip_network(cidr).hosts()))
                for pod in pods:
                    if pod["namespace"] != namespace:
                        continue
                    allowed = egress_allowed_ip(policies, pod, address, port)
                    if allowed != should(pod):
                        problems.append(f"{pod['name']} {'can' if allowed else 'cannot'} reach {store} at {address}")

    # The control plane's port: sidecars yes, strangers no.
    target = {"namespace": namespace, "labels": CP_SERVER_LABELS}
    for pod in pods:
        allowed = ingress_allowed(policies, pod, target, 9001, "http")
        if has_sidecar(pod) and not allowed:
            problems.append(f"{pod['name']} (a sidecar) cannot reach the control plane")
        if pod["name"].startswith("stranger") and allowed:
            problems.append(f"{pod['name']} can reach the control plane")
    # The control plane's internal port (/internal/): sidecars only — not the ingress controller,
    # not Prometheus, not strangers.
    outsiders = [
        {"name": "ingress controller", "namespace": "ingress-nginx", "labels": {"app.kubernetes.io/name": "ingress-nginx"}},
        {"name": "prometheus", "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}},
    ]
    for pod in pods + outsiders:
        allowed = ingress_allowed(policies, pod, target, 9002, "internal")
        if allowed != has_sidecar(pod):
            problems.append(f"{pod['name']} {'can' if allowed else 'cannot'} reach the control plane's internal port")
    # The sidecar admin port: the monitoring namespace only.
    app = one(docs, "Deployment", "idoctor")
    target = {"namespace": namespace, "labels": pod_labels(app)}
    prometheus = {"name": "prometheus", "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
    if not ingress_allowed(policies, prometheus, target, SIDECAR_ADMIN_PORT, "tollgate-admin"):
        problems.append("Prometheus cannot scrape the sidecar admin port")
    for pod in pods:
        if pod["name"].startswith("stranger") and ingress_allowed(policies, pod, target, SIDECAR_ADMIN_PORT, "tollgate-admin"):
            problems.append(f"{pod['name']} can reach the sidecar admin port")
    return problems


# --- monitoring -----------------------------------------------------------------------------


def code_metric_names(repo):
    names = set()
    for path in repo.glob("*/src/**/*.rs"):
        names.update(re.findall(r'"(tollgate_[a-z0-9_]+)"', path.read_text(errors="replace")))
    for path in repo.glob("*/*/src/**/*.rs"):
        names.update(re.findall(r'"(tollgate_[a-z0-9_]+)"', path.read_text(errors="replace")))
    return names


def promtool(promtool_bin, *args, cwd=None):
    proc = subprocess.run([promtool_bin, *args], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def monitoring_checks(checks, docs, repo, promtool_bin, work):
    rule = one(docs, "PrometheusRule", "tollgate")
    rules_file = work / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    rc, out = promtool(promtool_bin, "check", "rules", str(rules_file))
    checks.check("promtool check rules (PrometheusRule tollgate)", [] if rc == 0 else [out], out.splitlines()[-1] if rc == 0 else "")

    test_src = repo / "k8s/monitoring/tests/alerts.test.yaml"
    (work / "alerts.test.yaml").write_text(test_src.read_text())
    rc, out = promtool(promtool_bin, "test", "rules", "alerts.test.yaml", cwd=work)
    checks.check("promtool test rules (k8s/monitoring/tests/alerts.test.yaml)", [] if rc == 0 else [out])

    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    tested = set(re.findall(r"alertname:\s*(\S+)", test_src.read_text()))
    untested = sorted({a["alert"] for a in alerts} - tested)
    checks.check("every alert has a unit test", [f"untested: {', '.join(untested)}"] if untested else [])
    problems = [
        f"{a['alert']}: missing {k}" for a in alerts for k in ("summary", "description", "runbook")
        if not a.get("annotations", {}).get(k)
    ] + [f"{a['alert']}: no severity" for a in alerts if a.get("labels", {}).get("severity") not in ("warning", "critical")]
    troubleshooting = (repo / "docs/troubleshooting.md")
    anchors = set()
    if troubleshooting.exists():
        for line in troubleshooting.read_text().splitlines():
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    for a in alerts:
        runbook = a.get("annotations", {}).get("runbook", "")
        if "#" in runbook and runbook.split("#", 1)[1] not in anchors:
            problems.append(f"{a['alert']}: runbook {runbook} names no heading of docs/troubleshooting.md")
    checks.check("alerts have severity, summary, description and a runbook that exists", problems)

    # The dashboard: the file, and the ConfigMap that carries it.
    source = repo / "k8s/monitoring/dashboards/tollgate.json"
    problems = []
    try:
        dashboard = json.loads(source.read_text())
    except ValueError as e:
        checks.fail("dashboard JSON parses", str(e))
        return
    cm = configmap_data(docs, "tollgate-grafana-dashboard")
    if json.loads(cm.get("tollgate.json", "null")) != dashboard:
        problems.append("the ConfigMap does not carry the dashboard file")
    for key in ("uid", "title", "panels", "schemaVersion"):
        if not dashboard.get(key):
            problems.append(f"no {key}")
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    checks.check("dashboard JSON parses (file and ConfigMap)", problems, f"{len(ids)} panels")

    # Its PromQL: wrapped as recording rules (Grafana's variables given plain values) so that
    # promtool parses every expression.
    exprs = dashboard_exprs(dashboard)
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$namespace": ".*", "$route": ".*"}
    records = []
    for i, (title, expr) in enumerate(exprs):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            checks.fail("dashboard PromQL", f"{title}: unknown variable in {expr}")
        records.append({"record": f"dashboard:panel_{i}", "expr": expr})
    dash_rules = work / "dashboard-rules.yaml"
    dash_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    rc, out = promtool(promtool_bin, "check", "rules", str(dash_rules))
    checks.check("dashboard PromQL parses (promtool)", [] if rc == 0 else [out], f"{len(records)} expressions")

    # Every metric used exists in the code under that exact name.
    used_dashboard = metric_names(e for _, e in exprs)
    used_rules = metric_names(a["expr"] for a in alerts)
    in_code = code_metric_names(repo)
    used = used_dashboard | used_rules
    unknown = sorted(used - in_code)
    checks.check("every metric the dashboard and alerts use is registered in the code", [f"not in the code: {', '.join(unknown)}"] if unknown else [],
                 f"{len(used & in_code)} found in the code")
    print("INFO metrics used by the dashboard: " + ", ".join(sorted(used_dashboard)))
    print("INFO metrics used by the alert rules: " + ", ".join(sorted(used_rules)))

    # Scrape targets line up with what they select.
    problems = []
    sm = one(docs, "ServiceMonitor", "tollgate-control-plane")
    services = [s for s in find(docs, "Service") if s["metadata"].get("labels") and selector_matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    if len(services) != 1 or services[0]["metadata"]["name"] != "tollgate-control-plane":
        problems.append("ServiceMonitor does not select exactly the control plane Service")
    elif not all(any(p.get("name") == e.get("port") for p in services[0]["spec"]["ports"]) for e in sm["spec"]["endpoints"]):
        problems.append("ServiceMonitor endpoint port is not a port of the Service")
    pm = one(docs, "PodMonitor", "tollgate-sidecars")
    app = one(docs, "Deployment", "idoctor")
    if not selector_matches(pm["spec"]["selector"], pod_labels(app)):
        problems.append("PodMonitor does not select the app's pods")
    ports = {p["name"] for c in pod_spec(app)["containers"] for p in c.get("ports", [])}
    for e in pm["spec"]["podMetricsEndpoints"]:
        if e.get("port") not in ports:
            problems.append(f"PodMonitor port {e.get('port')} is no container port of the app's pods")
    checks.check("ServiceMonitor and PodMonitor select their targets", problems)


# --- the validator rejects what it should ---------------------------------------------------


def self_test(checks, versions, crd_schemas, docs):
    """The schema validation must reject broken objects, or its passes mean nothing."""
    dep = copy.deepcopy(one(docs, "Deployment", "tollgate-control-plane"))
    broken = []
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    broken.append(("replicas as a string", bad))
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    broken.append(("misspelt container field", bad))
    bad = copy.deepcopy(dep)
    del bad["spec"]["selector"]
    broken.append(("Deployment without selector", bad))
    bad = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    broken.append(("kind without a schema", bad))
    sm = copy.deepcopy(one(docs, "ServiceMonitor", "tollgate-control-plane"))
    sm["spec"]["endpoints"][0]["intervall"] = "30s"
    broken.append(("misspelt ServiceMonitor field", sm))
    pr = copy.deepcopy(one(docs, "PrometheusRule", "tollgate"))
    pr["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    broken.append(("PrometheusRule with a bad duration", pr))
    missed = [what for what, doc in broken if not schema_problems(doc, versions, crd_schemas)]
    checks.check("the validator rejects broken objects", [f"accepted: {', '.join(missed)}"] if missed else [], f"{len(broken)} rejected")


# --- main -----------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--schemas", required=True, type=Path)
    parser.add_argument("--overlays", type=Path, help="folder of the overlays (default: REPO/k8s/overlays)")
    parser.add_argument("--render", required=True, nargs="+", help="the render command, e.g. kubectl kustomize")
    args = parser.parse_args()

    checks = Checks()
    repo = args.repo
    kustomize = args.render
    overlays_dir = args.overlays or repo / "k8s/overlays"
    versions = [MIN_KUBERNETES, kv.latest_version()]
    crd_schemas = load_crd_schemas(args.schemas)
    print(f"INFO Kubernetes schemas {', '.join(versions)} (strict); own schemas for: "
          + ", ".join(k for _, k in sorted(crd_schemas)))

    rendered = {}
    for overlay in OVERLAYS:
        try:
            docs = render(kustomize, overlays_dir / overlay)
        except RuntimeError as e:
            checks.fail(f"{overlay}: kustomize build", str(e))
            continue
        checks.ok(f"{overlay}: kustomize build", f"{len(docs)} objects")
        rendered[overlay] = docs
        (args.work / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))

        for doc in docs:
            checks.check(f"{overlay}: schema {name_of(doc)}", schema_problems(doc, versions, crd_schemas))
        names = [name_of(d) for d in docs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        checks.check(f"{overlay}: object names are unique", [f"repeated: {', '.join(duplicates)}"] if duplicates else [])

        for w in docs:
            if w["kind"] in WORKLOAD_KINDS:
                checks.check(f"{overlay}: non-root, read-only, no capabilities, resources, probe ports: {name_of(w)}", security_problems(w))
        for label, fn in (
            ("control plane: replicas, probes, Secrets, JWT keys, migrations, HPA, PDB", lambda d: control_plane_problems(d)),
            ("app + sidecar: loopback app, routes ConfigMap, admin port, probes, termination", lambda d: sidecar_app_problems(d, repo)),
            ("exposure: admin port in no Service, Ingress only /v1 and /.well-known", exposure_problems),
            ("NetworkPolicies: Redis for sidecars + control plane, PostgreSQL for the control plane", lambda d: network_problems(d, overlay)),
        ):
            try:
                checks.check(f"{overlay}: {label}", fn(docs))
            except (LookupError, KeyError, TypeError, ValueError) as e:
                checks.fail(f"{overlay}: {label}", f"{type(e).__name__}: {e}")

    dev = rendered.get("dev", [])
    if any(d["kind"] == "StatefulSet" for d in dev):
        kinds = {pod_labels(d).get("app.kubernetes.io/name") for d in find(dev, "StatefulSet")}
        checks.check("dev: single-instance Redis and PostgreSQL StatefulSets",
                     [] if kinds == {"redis", "postgres"} and all(d["spec"]["replicas"] == 1 for d in find(dev, "StatefulSet")) else [f"found {kinds}"])
    elif "dev" in rendered:
        checks.fail("dev: single-instance Redis and PostgreSQL StatefulSets", "none rendered")
    if "prod" in rendered:
        prod = rendered["prod"]
        external = {s["metadata"]["name"] for s in find(prod, "Service") if s["spec"].get("type") == "ExternalName"}
        problems = [] if {"tollgate-redis", "tollgate-postgres"} <= external else [f"ExternalName services: {sorted(external)}"]
        if find(prod, "StatefulSet"):
            problems.append("prod runs StatefulSets")
        checks.check("prod: Redis and PostgreSQL are external services", problems)
        try:
            self_test(checks, versions, crd_schemas, prod)
            monitoring_checks(checks, prod, repo, args.promtool, args.work)
        except (LookupError, KeyError, TypeError, ValueError) as e:
            checks.fail("monitoring", f"{type(e).__name__}: {e}")

    print(f"k8s: {checks.passed} passed, {checks.failed} failed")
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
