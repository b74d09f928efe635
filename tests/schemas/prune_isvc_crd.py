"""Regenerate kserve-inferenceservice-v1beta1.json from KServe's published InferenceService CRD.

    python tests/schemas/prune_isvc_crd.py serving.kserve.io_inferenceservices.yaml KSERVE_COMMIT

The CRD (kserve/kserve, config/crd/full/serving.kserve.io_inferenceservices.yaml) is ~2 MB: its
predictor embeds a whole PodSpec. Kept: the v1beta1 openAPIV3Schema without descriptions, in full
for the fields dcgrpo renders (spec.predictor.model, spec.predictor.serviceAccountName); every other
field keeps its name and type, so a misspelt or unknown field is still caught.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

RENDERED = {"model", "serviceAccountName"}  # fields of spec.predictor we render: kept whole
OUT = Path(__file__).with_name("kserve-inferenceservice-v1beta1.json")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "description"}
    return [_strip(v) for v in x] if isinstance(x, list) else x


def _names_only(props: dict, keep: set[str]) -> dict:
    return {k: v if k in keep else {"type": v.get("type", "object")} for k, v in props.items()}


def prune(crd: dict, commit: str) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = _strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)  # the controller's, never applied
    spec = schema["properties"]["spec"]
    spec["properties"] = _names_only(spec["properties"], {"predictor"})
    predictor = spec["properties"]["predictor"]
    predictor["properties"] = _names_only(predictor["properties"], RENDERED)
    source = f"kserve/kserve@{commit}: config/crd/full/serving.kserve.io_inferenceservices.yaml"
    return {"$comment": f"Pruned from {source} by tests/schemas/prune_isvc_crd.py", **schema}


if __name__ == "__main__":
    crd_file, commit = sys.argv[1], sys.argv[2]
    OUT.write_text(json.dumps(prune(yaml.safe_load(Path(crd_file).read_text()), commit), indent=1, sort_keys=True))
    print(OUT, OUT.stat().st_size, "bytes")
