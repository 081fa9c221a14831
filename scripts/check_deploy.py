"""Checks that docker/ and deploy/ refer only to things that exist: `weft serve` flags, WEFT_*
variables and config keys, ports, paths, probe endpoints and the metric the autoscaler reads.

Usage: python scripts/check_deploy.py WEFT_BINARY RENDERED_BASE.yaml [RENDERED_GATEWAY.yaml]
"""

import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []


def check(ok, message):
    if not ok:
        problems.append(message)


def check_gateway(rendered, metric_sources, spec):
    """deploy/gateway: the pool selects Weft's pods on Weft's port, the picker it names exists
    and reads its configuration, and that configuration reads Weft's pods under the metric
    names Weft exports, chosen by the pods' engine label."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(pathlib.Path(rendered).read_text()) if d}
    weft = docs[("Deployment", "weft")]["spec"]["template"]
    labels = weft["metadata"]["labels"]
    pool = docs[("InferencePool", "weft")]["spec"]
    check(pool["selector"]["matchLabels"].items() <= labels.items(), "gateway: the pool does not select Weft's pods")
    port = weft["spec"]["containers"][0]["ports"][0]["containerPort"]
    check([p["number"] for p in pool["targetPorts"]] == [port], "gateway: the pool's target port is not Weft's")
    picker = pool["endpointPickerRef"]
    service = docs.get(("Service", picker["name"]))
    check(service is not None, f"gateway: no Service {picker['name']} for the endpoint picker")
    if service:
        check(picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]], "gateway: picker port")
    epp = docs[("Deployment", "weft-epp")]["spec"]["template"]["spec"]
    args = dict(a[2:].split("=", 1) for a in epp["containers"][0]["args"] if "=" in a)
    check(args.get("pool-name") == "weft", "gateway: the picker watches another pool")
    mount = epp["containers"][0]["volumeMounts"][0]["mountPath"]
    config_map = [v["configMap"]["name"] for v in epp["volumes"] if "configMap" in v][0]
    files = docs[("ConfigMap", config_map)]["data"]
    config_file = pathlib.PurePosixPath(args.get("config-file", "")).relative_to(mount).as_posix()
    check(config_file in files, "gateway: --config-file is not a file of the mounted ConfigMap")
    config = yaml.safe_load(files.get(config_file, "{}"))
    plugins = {p["type"]: p.get("parameters", {}) for p in config["plugins"]}
    check(plugins.get("metrics-data-source", {}).get("path") == "/metrics" and "/metrics:" in spec,
          "gateway: the picker reads metrics from another path")
    extractor = plugins["core-metrics-extractor"]
    engine = labels.get(extractor.get("engineLabelKey", "inference.networking.k8s.io/engine-type"))
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    check(engine in engines and extractor.get("defaultEngine") == engine,
          f"gateway: the pods' engine label {engine!r} is not the picker's engine configuration")
    for key, value in engines.get(engine, {}).items():
        if key.endswith("Spec") and value:
            name = value.split("{")[0]
            check(f'"{name}"' in metric_sources, f"gateway: {key} {name} is not a metric Weft exports")
    route = docs[("HTTPRoute", "weft")]["spec"]["rules"][0]["backendRefs"][0]
    check((route["kind"], route["name"]) == ("InferencePool", "weft"), "gateway: the route does not go to the pool")
    for (kind, name), doc in docs.items():
        if kind == "InferenceObjective":
            check(doc["spec"]["poolRef"]["name"] == "weft", f"gateway: objective {name} names another pool")


def main(binary, rendered, gateway=None):
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"--([a-z0-9-]+)", help_text))
    env_vars = set(re.findall(r"env: (WEFT_[A-Z0-9_]+)=", help_text))
    spec = (ROOT / "openapi.yaml").read_text()
    metric_sources = "".join(p.read_text() for p in (ROOT / "crates/server/src").glob("*.rs"))

    # Config files: every key is a flag.
    for path in [ROOT / "config/weft.toml", ROOT / "deploy/base/weft.toml"]:
        for key in tomllib.loads(path.read_text()):
            check(key.replace("_", "-") in flags, f"{path.relative_to(ROOT)}: `{key}` is not a `weft serve` flag")
    deploy_cfg = tomllib.loads((ROOT / "deploy/base/weft.toml").read_text())

    # Dockerfiles: variables, copied paths, exposed port, health endpoint.
    for name in ["Dockerfile", "Dockerfile.cuda"]:
        text = (ROOT / "docker" / name).read_text()
        for var in set(re.findall(r"\b(WEFT_[A-Z0-9_]+)=", text)):
            check(var in env_vars, f"docker/{name}: {var} is not a variable `weft serve` reads")
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for item in src.split():
                check((ROOT / item).exists(), f"docker/{name}: COPY source {item} does not exist")
        check("EXPOSE 8000" in text and "WEFT_PORT=8000" in text, f"docker/{name}: port is not 8000 throughout")
        check("/health" in text and "/health:" in spec, f"docker/{name}: HEALTHCHECK must use /health")

    # Compose: variables, mounted paths, ports, Prometheus target.
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    weft = compose["services"]["weft"]
    for var in weft.get("environment", {}):
        check(var in env_vars, f"docker/compose.yaml: {var} is not a variable `weft serve` reads")
    check((ROOT / "docker" / weft["build"]["context"] / weft["build"]["dockerfile"]).exists(), "compose: no Dockerfile")
    for volume in weft["volumes"] + compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"]:
        default = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", volume).split(":")[0]
        check((ROOT / "docker" / default).exists(), f"docker/compose.yaml: {default} does not exist")
    check(weft["ports"] == ["8000:8000"], "docker/compose.yaml: weft must publish 8000")
    # Grafana: the dashboard's data source is the provisioned one, and every series it plots
    # is one Weft exports.
    dashboard = (ROOT / "deploy/grafana/weft.json").read_text()
    datasources = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    check('"uid": "weft-prometheus"' in dashboard and datasources["datasources"][0]["uid"] == "weft-prometheus",
          "grafana: the dashboard's data source is not the provisioned one")
    for name in set(re.findall(r"weft:[a-z0-9_]+", dashboard)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        check(f'"{base}"' in metric_sources, f"deploy/grafana/weft.json: {name} is not a metric Weft exports")
    prom = yaml.safe_load((ROOT / "docker/prometheus.yml").read_text())
    check(prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["weft:8000"], "prometheus.yml target")

    # Manifests as kustomize renders them.
    docs = {d["kind"]: d for d in yaml.safe_load_all(pathlib.Path(rendered).read_text()) if d}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for arg in container["args"]:
        if arg.startswith("--"):
            check(arg[2:] in flags, f"deployment: {arg} is not a `weft serve` flag")
    for env in container.get("env", []):
        check(env["name"] in env_vars, f"deployment: {env['name']} is not a variable `weft serve` reads")
    port = container["ports"][0]["containerPort"]
    check(port == deploy_cfg["port"], "deployment: containerPort differs from weft.toml's port")
    check(pod["terminationGracePeriodSeconds"] > deploy_cfg["shutdown_timeout"], "grace period <= shutdown_timeout")
    for probe, path in [("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")]:
        check(container[probe]["httpGet"]["path"] == path, f"deployment: {probe} must use {path}")
        check(f"{path}:" in spec, f"openapi.yaml has no {path}")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    check(deploy_cfg["model"].startswith(mounts["models"] + "/"), "weft.toml model is not under the models mount")
    check(mounts["config"] + "/weft.toml" in container["args"], "deployment: --config is not the mounted file")
    config_maps = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    check(config_maps == [docs["ConfigMap"]["metadata"]["name"]], "deployment: config volume is not the ConfigMap")
    claim = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    check(claim == [docs["PersistentVolumeClaim"]["metadata"]["name"]], "deployment: model volume is not the PVC")
    check(docs["Service"]["spec"]["ports"][0]["targetPort"] in ("http", port), "service: targetPort")
    selector = docs["Service"]["spec"]["selector"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in selector.items()), "service selector does not match the pods")
    check(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items(), "pdb selector")
    hpa_metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((ROOT / "deploy/prometheus-adapter/values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    check(rule["name"]["as"] == hpa_metric, "prometheus-adapter rule does not produce the HPA's metric")
    series = rule["seriesQuery"].split("{")[0]
    check(f'"{series}"' in metric_sources, f"the server exports no metric {series}")

    if gateway:
        check_gateway(gateway, metric_sources, spec)

    for p in problems:
        print(f"check_deploy: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_deploy: docker/ and deploy/ are consistent with {binary} ({len(flags)} flags)")


if __name__ == "__main__":
    main(*sys.argv[1:])
