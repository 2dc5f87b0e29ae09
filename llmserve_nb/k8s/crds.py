"""Where CustomResourceDefinitions come from, and their schemas as the API server applies them.

A `CrdSource` is either folders of YAML (`CrdDirectory`: any file names, `kubectl get crd ... -o yaml` output
included) or a live cluster read through the Kubernetes API (`ClusterCrds`, apiextensions.k8s.io/v1, as
`kubectl get crd` does). There is no default folder: callers name one, or set $LLMSERVE_NB_CRDS.
"""

from __future__ import annotations

import copy
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import yaml

from llmserve_nb.k8s.options import ManifestError

CRD_ENV = "LLMSERVE_NB_CRDS"
# (group, kind) -> plural: the CRD is `<plural>.<group>` (what `kubectl get crd` names).
CRDS = {
    ("ray.io", "RayCluster"): "rayclusters",
    ("ray.io", "RayService"): "rayservices",
    ("ray.io", "RayJob"): "rayjobs",
    ("gateway.networking.k8s.io", "GatewayClass"): "gatewayclasses",
    ("gateway.networking.k8s.io", "Gateway"): "gateways",
    ("gateway.networking.k8s.io", "HTTPRoute"): "httproutes",
    ("monitoring.coreos.com", "PodMonitor"): "podmonitors",
    ("monitoring.coreos.com", "ServiceMonitor"): "servicemonitors",
    ("monitoring.coreos.com", "PrometheusRule"): "prometheusrules",
}
CRD_GROUPS = {group for group, _ in CRDS}
_NO_SOURCE = (
    "no CRD source: pass --crds DIR (YAML files holding the CustomResourceDefinitions, e.g. from "
    "`kubectl get crd rayservices.ray.io rayclusters.ray.io -o yaml > DIR/crds.yaml`) or --from-cluster, "
    f"or set ${CRD_ENV} to such folders (separated by '{os.pathsep}')"
)


class CrdSource(ABC):
    """Where CustomResourceDefinitions come from: folders of YAML (`CrdDirectory`) or a live cluster (`ClusterCrds`)."""

    @abstractmethod
    def crd(self, group: str, kind: str) -> dict[str, Any]:
        """The CRD object (as `kubectl get crd <plural>.<group> -o yaml` shows it); ManifestError when absent."""

    def schema(self, group: str, kind: str, version: str) -> dict[str, Any]:
        key = (group, kind, version)
        cache = self.__dict__.setdefault("_schemas", {})
        if key not in cache:
            cache[key] = _crd_schema(self.crd(group, kind), group, kind, version)
        return cache[key]


class CrdDirectory(CrdSource):
    """CRDs from YAML files in folders (recursively), whatever the file names: each CustomResourceDefinition
    document, or item of a `List` (`kubectl get crd ... -o yaml` of several), is indexed by its group and kind."""

    def __init__(self, *folders: str | Path) -> None:
        self.folders = [Path(f) for f in folders]
        self._index: dict[tuple[str, str], dict[str, Any]] | None = None

    def _load(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self._index is None:
            missing = [str(f) for f in self.folders if not f.is_dir()]
            if missing:
                raise ManifestError(f"CRD folder(s) not found: {', '.join(missing)}")
            self._index = {}
            for folder in self.folders:
                for path in sorted(folder.rglob("*.y*ml")):
                    for doc in _yaml_docs(path):
                        for crd in doc.get("items", []) if doc.get("kind") == "List" else [doc]:
                            if isinstance(crd, dict) and crd.get("kind") == "CustomResourceDefinition":
                                names = crd["spec"]["names"]
                                self._index.setdefault((crd["spec"]["group"], names["kind"]), crd)
        return self._index

    def crd(self, group: str, kind: str) -> dict[str, Any]:
        found = self._load().get((group, kind))
        if found is None:
            name = f"{CRDS.get((group, kind), kind.lower() + 's')}.{group}"
            where = ", ".join(map(str, self.folders))
            raise ManifestError(
                f"CRD {name} ({kind}) not found in {where}. Add it: `kubectl get crd {name} -o yaml > "
                f"DIR/{name}.yaml`, or validate against the cluster itself with --from-cluster."
            )
        return found

    def __repr__(self) -> str:
        return f"CrdDirectory({', '.join(map(str, self.folders))})"


class ClusterCrds(CrdSource):
    """CRDs read from a cluster's API (apiextensions.k8s.io/v1, like `kubectl get crd`), with the `kubernetes`
    client and the kubeconfig's `context` (default: the current one; in a pod, its ServiceAccount)."""

    def __init__(self, context: str | None = None) -> None:
        self.context = context
        self._api: Any = None

    def _client(self) -> Any:
        if self._api is None:
            try:
                from kubernetes import client, config
            except ImportError:
                raise ManifestError(
                    "--from-cluster needs the Kubernetes client: pip install kubernetes (or llmserve-nb[notebook])"
                ) from None
            try:
                # $KUBECONFIG read now (the client reads it once, at import), into a client of our own: the
                # kubernetes module's global default configuration stays untouched.
                api_client = config.new_client_from_config(
                    config_file=os.environ.get("KUBECONFIG") or None, context=self.context
                )
            except config.ConfigException as e:
                if self.context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                    raise ManifestError(f"no cluster to read CRDs from: {e}") from None
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
                api_client = client.ApiClient(cfg)
            self._api = client.ApiextensionsV1Api(api_client)
        return self._api

    def crd(self, group: str, kind: str) -> dict[str, Any]:
        name = f"{CRDS.get((group, kind), kind.lower() + 's')}.{group}"
        api = self._client()
        try:
            # Raw JSON, not the client's model: its to_dict() renames fields (openAPIV3Schema -> open_apiv3_schema).
            raw = api.read_custom_resource_definition(name, _preload_content=False)
        except Exception as e:  # kubernetes.client.ApiException, or the connection's error
            status = getattr(e, "status", None)
            if status == 404:
                raise ManifestError(f"the cluster has no CRD {name} ({kind}): install its operator first") from None
            raise ManifestError(f"cannot read CRD {name} from the cluster: {e}") from None
        return json.loads(raw.data)

    def __repr__(self) -> str:
        return f"ClusterCrds(context={self.context!r})"


CrdsArg = Union[CrdSource, str, Path, Sequence[Union[str, Path]], None]


def crd_source(crds: CrdsArg = None) -> CrdSource:
    """A CrdSource from what callers pass: a source, a folder, folders, or None for ${LLMSERVE_NB_CRDS}
    (folders separated by os.pathsep). No default folder: without either, ManifestError says what to pass."""
    if isinstance(crds, CrdSource):
        return crds
    if crds is None:
        env = os.environ.get(CRD_ENV)
        if not env:
            raise ManifestError(_NO_SOURCE)
        folders = [p for p in env.split(os.pathsep) if p]
    else:
        folders = [crds] if isinstance(crds, (str, Path)) else list(crds)
    return _directory(tuple(str(Path(f).resolve()) for f in folders))


@lru_cache(maxsize=32)
def _directory(folders: tuple[str, ...]) -> CrdDirectory:
    # Parsing the KubeRay CRDs (3 MB of YAML) once per folder set, not once per validated object.
    return CrdDirectory(*folders)


def crd_dir(path: str | Path | None = None) -> Path | None:
    """The first CRD folder `path` or ${LLMSERVE_NB_CRDS} names; None when neither does (there is no default)."""
    first = str(path) if path else (os.environ.get(CRD_ENV) or "").split(os.pathsep)[0]
    return Path(first) if first else None


# libyaml's loader where PyYAML has it: the KubeRay CRDs alone are 3 MB, ~10 s for the pure-Python one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    try:
        return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []


def _crd_schema(crd: dict[str, Any], group: str, kind: str, version: str) -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _OBJECT_META
            schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = ["apiVersion", "kind", "metadata"]
            return _structural(schema)
    served = ", ".join(v["name"] for v in crd["spec"]["versions"])
    raise ManifestError(f"CRD {crd['metadata']['name']} has no version {version!r} of {kind} (it serves: {served})")


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turn a CRD structural schema into a jsonschema that fails where the API server would reject."""
    node = dict(node)
    if isinstance(node.get("properties"), dict):
        props = node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
        # The API server applies defaults before checking `required`, so a defaulted field may be omitted.
        if "required" in node:
            node["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [_structural(n) for n in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        node.pop("type", None)
    if node.get("type") == "integer" and node.get("format") in _INT_RANGES:
        lo, hi = _INT_RANGES[node["format"]]
        node.setdefault("minimum", lo)
        node.setdefault("maximum", hi)
    return node
