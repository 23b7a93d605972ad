"""The deployment files in deploy/ (issue 21 §3) agree with the code they deploy.

- deploy/ray-serve.yaml validates against Ray Serve's own schema (``ServeDeploySchema``, with no key that
  the schema would silently ignore); its import_path is ``restok.serving.ray_serve:app_builder``, its
  ``args`` are keys app_builder reads, and app_builder builds the application from them (without Ray running);
- deploy/kuberay-rayservice.yaml's serveConfigV2 is that same config; its Ray containers leave the probes to
  KubeRay, expose the Serve port, and have room for max_replicas replicas;
- deploy/kubernetes.yaml's probes, metrics annotation and Service point at real routes and the container
  port; every RESTOK_SERVE_* variable is a ``restok serve`` option whose value parses; the grace period
  outlasts the drain;
- deploy/Dockerfile and deploy/Dockerfile.cuda pin the Makefile's TORCH_SPEC, install extras that exist in
  pyproject.toml, and bake the export the other files point at.

Docker is not available where the tests run: no image is built or run here, so these checks read the
Dockerfiles as text (what they pin, install and set), not the images they make. Kubernetes and KubeRay are
not here either: the manifests are checked against the app, the CLI and Ray Serve's schema, not applied.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with the ray extra (in dev)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENV_PREFIX = "RESTOK_SERVE_"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


# ---------------------------------------------------------------------------------------------- readers

def _yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def _serve_config() -> dict:
    return _yaml("ray-serve.yaml")


def _app(doc: dict) -> dict:
    (app,) = doc["applications"]
    return app


def _k8s() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["Deployment", "Service"], kinds
    return {d["kind"]: d for d in docs}


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _env_values(container: dict) -> dict[str, str]:
    return {k: e["value"] for k, e in _env(container).items() if "value" in e}


def _container_port(container: dict, port) -> int:
    """A probe's or Service's port (a number or the name of one of the container's ports) as a number."""
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    if isinstance(port, int):
        assert port in ports.values(), f"port {port} is not a port of the container ({ports})"
        return port
    assert port in ports, f"port {port!r} names none of the container's ports ({ports})"
    return ports[port]


def _dockerfile(name: str) -> dict:
    """The instructions of a Dockerfile (continuation lines joined, comments dropped), its ARG defaults and ENV."""
    lines, cur = [], ""
    for raw in (DEPLOY / name).read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):  # a comment inside a continued instruction
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    instr = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]
    args, env = {}, {}
    for op, rest in instr:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        if op == "ENV":
            for tok in shlex.split(rest):
                k, v = tok.split("=", 1)
                env[k] = v
    return {"instr": instr, "args": args, "env": env}


def _expand(text: str, args: dict) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _pip_installs(df: dict) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN lines, with ARG defaults substituted."""
    out = []
    for op, rest in df["instr"]:
        if op != "RUN":
            continue
        for part in re.split(r"&&|;", rest):
            toks = shlex.split(_expand(part, df["args"]))
            if "pip" in toks and "install" in toks[toks.index("pip"):]:
                toks = toks[toks.index("install", toks.index("pip")) + 1:]
                words, skip = [], False
                for t in toks:
                    if skip:
                        skip = False
                    elif t in ("--index-url", "--extra-index-url", "-i", "-c", "-r"):
                        skip = True
                    elif not t.startswith("-"):
                        words.append(t)
                out.append(words)
    return out


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _makefile_torch_spec() -> str:
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "no TORCH_SPEC ?= ... in the Makefile"
    return m.group(1)


def _routes() -> set[str]:
    pytest.importorskip("fastapi")
    from restok.serving.app import ServeConfig, create_app

    return {r.path for r in create_app(ServeConfig(artifacts="unused")).routes}


def _serve_parser():
    from restok.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["serve"]


def _serve_dests() -> set[str]:
    return {a.dest for a in _serve_parser()._actions if a.option_strings and a.dest != "help"}


def _parse_serve_env(monkeypatch, env: dict[str, str]):
    """``restok serve``'s arguments with only these RESTOK_SERVE_* variables set (and no flags)."""
    import os

    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from restok.cli import build_parser

    return build_parser().parse_args(["serve"])


def _check_serve_env(monkeypatch, env: dict[str, str], where: str):
    """Every RESTOK_SERVE_* name is a serve option and its value parses like the flag (restok.cli.serve)."""
    serve_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert serve_env, f"{where}: no {ENV_PREFIX}* variables"
    dests = _serve_dests()
    unknown = sorted(k for k in serve_env if k[len(ENV_PREFIX):].lower() not in dests)
    assert not unknown, f"{where}: {unknown} are no restok serve options ({sorted(dests)})"
    args = _parse_serve_env(monkeypatch, serve_env)
    assert args.env_errors == [], f"{where}: {args.env_errors}"
    return args


def _validate_serve_config(doc: dict) -> None:
    """Ray Serve's own schema, plus no key it would ignore (its models accept unknown keys silently)."""
    schema = pytest.importorskip("ray.serve.schema")
    validate = getattr(schema.ServeDeploySchema, "model_validate", None) or schema.ServeDeploySchema.parse_obj
    validate(doc)

    def fields(model) -> set[str]:
        return set(getattr(model, "model_fields", None) or model.__fields__)

    assert set(doc) <= fields(schema.ServeDeploySchema), set(doc) - fields(schema.ServeDeploySchema)
    assert set(doc.get("http_options", {})) <= fields(schema.HTTPOptionsSchema)
    for app in doc["applications"]:
        assert set(app) <= fields(schema.ServeApplicationSchema), set(app) - fields(schema.ServeApplicationSchema)


def _keys_read(fn) -> tuple[set[str], set[str]]:
    """(the keys fn takes from its first argument, the required ones), from its module's APP_ARGS where it
    declares them and from its source: ``args.get("k")`` and ``args["k"]`` (required: read with [] and never
    with .get)."""
    tree = ast.parse(inspect.getsource(fn).lstrip())
    func = tree.body[0]
    name = func.args.args[0].arg
    got, indexed = set(), set()
    for node in ast.walk(func):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == name
                and node.args and isinstance(node.args[0], ast.Constant)):
            got.add(node.args[0].value)
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == name
                and isinstance(node.slice, ast.Constant)):
            indexed.add(node.slice.value)
    declared = set(getattr(inspect.getmodule(fn), "APP_ARGS", ()))
    return declared | got | indexed, indexed - got


def _cpus(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ---------------------------------------------------------------------------------------------- Ray Serve

def test_ray_serve_config_validates_against_ray_schema():
    doc = _serve_config()
    _validate_serve_config(doc)
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app = _app(doc)
    assert app["route_prefix"] == "/"


def test_ray_serve_import_path_and_args_are_app_builders():
    app = _app(_serve_config())
    module, _, attr = app["import_path"].partition(":")
    fn = getattr(importlib.import_module(module), attr)
    from restok.serving.ray_serve import app_builder

    assert fn is app_builder and callable(fn)
    read, required = _keys_read(app_builder)
    assert {"artifacts", "replicas", "max_queue"} <= read, f"the source check found too little: {read}"
    args = app["args"]
    assert set(args) <= read, f"args app_builder does not read: {sorted(set(args) - read)} (it reads {sorted(read)})"
    assert required <= set(args), f"args app_builder requires: {sorted(required - set(args))}"
    assert "api_key" not in args, "no key in a committed file: RESTOK_API_KEY on the Ray nodes"


def test_ray_serve_args_build_the_application_without_starting_ray(capsys):
    pytest.importorskip("ray.serve")
    import ray

    from restok.serving.ray_serve import app_builder

    args = _app(_serve_config())["args"]
    with capsys.disabled():  # serve.ingress pickles the app: not with pytest's capture file in sys.stdout
        dep = app_builder(dict(args))._bound_deployment
    assert dep.ray_actor_options == {"num_cpus": float(args["cpus_per_replica"]),
                                     "num_gpus": float(args["gpus_per_replica"])}
    assert dep.max_ongoing_requests == int(args["max_queue"])
    auto = dep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (int(args["replicas"]), int(args["max_replicas"]))
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------- KubeRay

def test_rayservice_serve_config_is_the_ray_serve_config():
    rs = _yaml("kuberay-rayservice.yaml")
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    assert isinstance(rs["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    inner = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert inner == _serve_config()
    _validate_serve_config(inner)


def test_rayservice_cluster_runs_the_application():
    rs = _yaml("kuberay-rayservice.yaml")
    cluster = rs["spec"]["rayClusterConfig"]
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    args, port = _app(serve_cfg)["args"], serve_cfg["http_options"]["port"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert workers, "a worker group"
    for group in [head, *workers]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams are strings: {params}"
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
        assert ray_container["image"] == "restok:cpu"
        # KubeRay injects raylet/GCS probes (and the Serve proxy's /-/healthz on workers) unless one is set.
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe not in ray_container, f"{ray_container['name']}: leave {probe} to KubeRay"
        key = _env(ray_container).get("RESTOK_API_KEY", {})
        assert "secretKeyRef" in key.get("valueFrom", {}), "the API key from a Secret, where the app is built"
    assert head["rayStartParams"].get("num-cpus") == "0", "no Serve replicas on the head"
    for w in workers:
        serve_ports = [p["containerPort"] for p in w["template"]["spec"]["containers"][0]["ports"]
                       if p.get("name") == "serve"]
        assert serve_ports == [port], "KubeRay finds the Serve proxy by the port named serve"
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    # room for max_replicas replicas of cpus_per_replica CPUs (the Ray autoscaler adds the worker pods)
    room = sum(w["maxReplicas"] * (_cpus(w["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                                   // float(args["cpus_per_replica"])) for w in workers)
    assert room >= int(args.get("max_replicas") or args["replicas"]), room
    if int(args.get("max_replicas") or 0) > int(args["replicas"]):
        assert cluster.get("enableInTreeAutoscaling") is True, "Serve autoscaling needs pods from the Ray autoscaler"
    floor = next(re.search(r">=\s*([\d.]+)", d).group(1) for d in _pyproject()["project"]["optional-dependencies"]["ray"]
                 if d.startswith("ray["))
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(cluster["rayVersion"]) >= as_tuple(floor), f"rayVersion below the ray extra's {floor}"


def test_rayservice_image_is_built_with_the_ray_extra():
    text = (DEPLOY / "kuberay-rayservice.yaml").read_text()
    m = re.search(r"docker build -f deploy/(\S+) --build-arg EXTRAS=(\S+) -t (\S+) \.", text)
    assert m, "the build command of the image, in a comment"
    dockerfile, extras, tag = m.groups()
    assert dockerfile in DOCKERFILES and "EXTRAS" in _dockerfile(dockerfile)["args"]
    assert "ray" in extras.split(",") and set(extras.split(",")) <= set(_pyproject()["project"]["optional-dependencies"])
    assert tag == "restok:cpu"


# ---------------------------------------------------------------------------------------------- Kubernetes

def test_kubernetes_probes_and_metrics_are_routes_of_the_app():
    routes = _routes()
    dep = _k8s()["Deployment"]
    c = _container(dep)
    port = int(_env_values(c)["RESTOK_SERVE_PORT"])
    want = {"readinessProbe": "/health/ready", "livenessProbe": "/health/live", "startupProbe": "/health/live"}
    for probe, path in want.items():
        if probe == "startupProbe" and probe not in c:
            continue
        got = c[probe]["httpGet"]
        assert got["path"] == path and path in routes, f"{probe}: {got['path']} (routes: {sorted(routes)})"
        assert _container_port(c, got["port"]) == port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/path"] in routes and int(ann["prometheus.io/port"]) == port
    assert [p["containerPort"] for p in c["ports"]] == [port]


def test_kubernetes_probe_and_metrics_routes_need_no_key():
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from restok.serving.app import ServeConfig, create_app

    dep = _k8s()["Deployment"]
    c = _container(dep)
    assert "RESTOK_SERVE_PROTECT_METRICS" not in _env_values(c), "Prometheus scrapes without the key"
    paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in c}
    paths.add(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    client = TestClient(create_app(ServeConfig(artifacts="unused", api_key="k")), raise_server_exceptions=False)
    for path in sorted(paths):  # no lifespan: no model; whatever the status, it is not 401
        assert client.get(path).status_code != 401, path
    assert client.get("/v1/models").status_code == 401  # the key is checked on the API


def test_kubernetes_env_names_are_serve_options_and_parse(monkeypatch):
    c = _container(_k8s()["Deployment"])
    env = _env_values(c)
    args = _check_serve_env(monkeypatch, env, "kubernetes.yaml")
    assert args.host == "0.0.0.0" and args.port == c["ports"][0]["containerPort"]
    assert args.max_queue == int(env["RESTOK_SERVE_MAX_QUEUE"])
    assert args.drain_seconds == float(env["RESTOK_SERVE_DRAIN_SECONDS"])
    key = _env(c)["RESTOK_API_KEY"]
    assert "secretKeyRef" in key.get("valueFrom", {}) and "value" not in key, "the API key from a Secret"
    assert "RESTOK_SERVE_API_KEY" not in _env(c), "no key in a committed file"


def test_kubernetes_grace_period_outlasts_the_drain(monkeypatch):
    dep = _k8s()["Deployment"]
    c = _container(dep)
    drain = _check_serve_env(monkeypatch, _env_values(c), "kubernetes.yaml").drain_seconds
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + pre_stop, f"terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {pre_stop}"


def test_kubernetes_service_and_writable_cache():
    k = _k8s()
    dep, svc = k["Deployment"], k["Service"]
    c = _container(dep)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    port = int(_env_values(c)["RESTOK_SERVE_PORT"])
    assert [_container_port(c, p["targetPort"]) for p in svc["spec"]["ports"]] == [port]
    assert c["image"] == "restok:cpu"
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        cache = _env_values(c).get("RESTOK_CACHE", "")
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert any(cache == m or cache.startswith(m.rstrip("/") + "/") for m in mounts), \
            f"RESTOK_CACHE {cache!r} must be on a volume (mounts {mounts}): the root filesystem is read-only"
    uid = dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    user = next(rest for op, rest in _dockerfile("Dockerfile")["instr"] if op == "USER")
    assert user.split(":")[0] == str(uid), f"the image's USER {user} is the pod's runAsUser {uid}"


# ---------------------------------------------------------------------------------------------- Dockerfiles

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_the_makefiles_torch_and_real_extras(name):
    df = _dockerfile(name)
    spec = _makefile_torch_spec()
    installs = _pip_installs(df)
    torch_words = [w for words in installs for w in words if re.match(r"torch(\s*[=<>!~]|$)", w)]
    assert torch_words and set(torch_words) == {spec}, f"{name}: torch {torch_words}, the Makefile's {spec}"
    extras = [set(m.group(1).split(",")) for words in installs for w in words if (m := re.fullmatch(r"\.\[(.*)\]", w))]
    assert extras, f"{name}: no pip install .[extras]"
    known = set(_pyproject()["project"]["optional-dependencies"])
    for e in extras:
        assert e <= known, f"{name}: extras {sorted(e - known)} are not in pyproject.toml ({sorted(known)})"
        assert "serve" in e
    if name == "Dockerfile":
        cpu_index = [t for op, rest in df["instr"] if op == "RUN" and "--index-url" in (t := shlex.split(_expand(rest, df["args"])))
                     and t[t.index("--index-url") + 1].endswith("/whl/cpu") and spec in t]
        assert cpu_index, "torch from the CPU wheel index"
        assert next(rest for op, rest in df["instr"] if op == "FROM") == "python:3.11-slim"
    else:
        assert any("cuda" in e for e in extras) and df["env"]["RESTOK_SERVE_BACKEND"] == "cuda"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_serves_the_export_the_deploy_files_name(name, monkeypatch):
    import json

    df = _dockerfile(name)
    entry = json.loads(next(rest for op, rest in df["instr"] if op == "ENTRYPOINT"))
    assert entry == ["restok", "serve"] and "restok" in _pyproject()["project"]["scripts"]
    user = next(rest for op, rest in df["instr"] if op == "USER")
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "a numeric non-root user (runAsNonRoot)"
    args = _check_serve_env(monkeypatch, df["env"], name)
    assert args.host == "0.0.0.0"
    exposed = [int(p.split("/")[0]) for op, rest in df["instr"] if op == "EXPOSE" for p in rest.split()]
    assert exposed == [args.port]
    outs = [m.group(1) for op, rest in df["instr"] if op == "RUN"
            for m in [re.search(r"restok export --out (\S+)", rest)] if m]
    assert outs == [df["env"]["RESTOK_SERVE_ARTIFACTS"]], "the image bakes the export it serves"
    assert _env_values(_container(_k8s()["Deployment"]))["RESTOK_SERVE_ARTIFACTS"] == outs[0]
    assert _app(_serve_config())["args"]["artifacts"] == outs[0]


def test_dockerignore_keeps_local_state_out_but_not_the_sources():
    patterns = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".venv", ".git", "runs", "out"} <= patterns
    copied = {w for name in DOCKERFILES for op, rest in _dockerfile(name)["instr"] if op == "COPY"
              for w in rest.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "restok"}
    assert not copied & patterns
