"""Renders deploy/base and its overlays the way `kubectl kustomize` does for the features they
use (resources, directories among them; a configMapGenerator; labels with selectors; JSON 6902
patches that add or replace), for machines without kubectl. Generated ConfigMaps keep their
names (kustomize appends a hash of their content and rewrites the references to match).

Usage: python scripts/render_kustomize.py deploy/base > rendered.yaml
"""

import pathlib
import sys

import yaml


def add_labels(doc, labels):
    doc.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
    if doc["kind"] == "Service":
        spec.setdefault("selector", {}).update(labels)
    if doc["kind"] == "Deployment":
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels)


def apply_patch(doc, operations):
    """JSON 6902 `add` and `replace` on objects (the only ones the overlays use)."""
    for op in operations:
        if op["op"] not in ("add", "replace"):
            raise SystemExit(f"unsupported patch operation {op['op']!r}")
        keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        node = doc
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if op["op"] == "replace" and keys[-1] not in node:
            raise SystemExit(f"replace of a missing {op['path']}")
        node[keys[-1]] = op["value"]


def render(base):
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = base / resource
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for generator in kustomization.get("configMapGenerator", []):
        data = {f: (base / f).read_text() for f in generator["files"]}
        docs.insert(0, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for entry in kustomization.get("labels", []):
        for doc in docs:
            add_labels(doc, entry["pairs"])
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if len(matched) != 1:
            raise SystemExit(f"{base}: the patch target {target} matches {len(matched)} resources")
        apply_patch(matched[0], yaml.safe_load(patch["patch"]))
    return docs


def main(base):
    yaml.safe_dump_all(render(pathlib.Path(base)), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1])
