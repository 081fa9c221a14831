"""Validates the custom resources among rendered manifests (the inference gateway's
InferencePool, InferenceObjective and HTTPRoute) against the CRD schemas of the pinned releases
in scripts/crd-schemas/ (each file names its source and commit), as strictly as an API server
with strict field validation: unknown fields are errors. The CRDs' CEL rules
(x-kubernetes-validations) are not evaluated here. Built-in kinds are kubernetes-validate's.

Usage: python scripts/validate_crs.py RENDERED_MANIFESTS.yaml
"""

import json
import pathlib
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "crd-schemas"
BUILT_IN_GROUPS = {"", "apps", "batch", "autoscaling", "policy", "rbac.authorization.k8s.io", "networking.k8s.io"}


def closed(schema):
    """The schema with unknown fields refused wherever the CRD lists the fields (as the API
    server prunes or, with strict validation, refuses them)."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def main(rendered):
    schemas = {}
    for path in SCHEMAS.glob("*.json"):
        doc = json.loads(path.read_text())
        schemas[(doc["apiVersion"], doc["kind"])] = closed(doc["schema"])
    problems = []
    checked = 0
    for doc in yaml.safe_load_all(pathlib.Path(rendered).read_text()):
        if not doc:
            continue
        api, kind, name = doc["apiVersion"], doc["kind"], doc["metadata"]["name"]
        group = api.rpartition("/")[0]
        if group in BUILT_IN_GROUPS:
            continue
        schema = schemas.get((api, kind))
        if schema is None:
            problems.append(f"{kind} {name}: no schema for {api} in {SCHEMAS}")
            continue
        # metadata is the API server's (ObjectMeta): the CRD schema leaves it open.
        for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            problems.append(f"{kind} {name}: {where}: {error.message}")
        checked += 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{checked} custom resources match their CRD schemas")


if __name__ == "__main__":
    main(sys.argv[1])
