"""Renders deploy/base the way `kubectl kustomize` does for the features it uses (resources,
a configMapGenerator, labels with selectors), for machines without kubectl.

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


def main(base):
    base = pathlib.Path(base)
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for r in kustomization["resources"] for d in yaml.safe_load_all((base / r).read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {f: (base / f).read_text() for f in generator["files"]}
        docs.insert(0, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for entry in kustomization.get("labels", []):
        for doc in docs:
            add_labels(doc, entry["pairs"])
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1])
