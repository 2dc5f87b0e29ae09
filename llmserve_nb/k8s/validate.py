"""Validation the way the API server (and the operators) would do it, without a cluster.

Custom resources (KubeRay, Gateway API, Prometheus Operator) against their CRDs' openAPIV3Schema with
`jsonschema`, prepared as the API server applies it (defaulted fields are not required, nulls dropped,
unknown fields rejected), plus the checks KubeRay v1.7's webhook-less validation makes when it reconciles
(ray-operator/controllers/ray/utils/validation.go) and each RayService `serveConfigV2` against Ray's own
`ServeDeploySchema`. Core kinds with `kubernetes-validate` in strict mode; Kustomizations by their fields
and the files they name. CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmserve_nb.k8s.crds import CRD_GROUPS, CRDS, CrdsArg, crd_source
from llmserve_nb.k8s.options import ManifestError

_KUSTOMIZE_KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
}


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _describe(err: Any) -> str:
    import jsonschema

    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        unknown = sorted(k for k in err.instance if k not in allowed)
        return f"{_path(err.absolute_path)}: unknown field(s) {', '.join(map(repr, unknown))}"
    if err.validator in ("anyOf", "oneOf") and err.context:
        best = jsonschema.exceptions.best_match(err.context)
        return f"{_path(err.absolute_path)}: {best.message}"
    return f"{_path(err.absolute_path)}: {err.message}"


def _validate_custom(obj: dict[str, Any], crds: CrdsArg) -> list[str]:
    import jsonschema

    group, _, version = obj["apiVersion"].partition("/")
    kind = obj["kind"]
    if (group, kind) not in CRDS:
        known = ", ".join(k for g, k in CRDS if g == group)
        return [f"kind: {obj['apiVersion']} {kind} is not a kind this validator knows for {group} ({known})"]
    schema = crd_source(crds).schema(group, kind, version)
    validator = jsonschema.Draft7Validator(schema)
    errors = [_describe(e) for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    if errors:
        return errors
    spec = obj.get("spec", {})
    if kind == "RayCluster":
        errors += _kuberay_cluster_rules(spec, "spec")
    elif kind == "RayService":
        errors += _kuberay_service_rules(spec)
        if isinstance(spec.get("serveConfigV2"), str):
            errors += _validate_serve_config(spec["serveConfigV2"])
    return errors


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.split("-")[0].split("."))
    except ValueError:
        return None


def _kuberay_cluster_rules(cluster: dict[str, Any], where: str) -> list[str]:
    """ValidateRayClusterSpec's auth rules (KubeRay v1.7): token auth needs Ray >= 2.52 (2.55 for K8s tokens)."""
    auth = cluster.get("authOptions") or {}
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") != "token":
        return [f"{where}.authOptions: enableK8sTokenAuth needs mode 'token'"] if k8s_auth else []
    version = _version(str(cluster.get("rayVersion", "")))
    if version is None:
        return [f"{where}.rayVersion: authOptions.mode is 'token', which needs a valid rayVersion >= 2.52.0"]
    errors = []
    if version < (2, 52, 0):
        errors.append(f"{where}.rayVersion: authOptions.mode 'token' needs Ray >= 2.52.0, got {cluster['rayVersion']}")
    if k8s_auth and version < (2, 55, 0):
        errors.append(f"{where}.rayVersion: authOptions.enableK8sTokenAuth needs Ray >= 2.55.0")
    if k8s_auth and auth.get("secretName"):
        errors.append(f"{where}.authOptions: enableK8sTokenAuth and secretName exclude each other")
    return errors


def _kuberay_service_rules(spec: dict[str, Any]) -> list[str]:
    """ValidateRayServiceSpec and ValidateClusterUpgradeOptions (KubeRay v1.7)."""
    cluster = spec.get("rayClusterConfig") or {}
    errors = _kuberay_cluster_rules(cluster, "spec.rayClusterConfig")
    if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth") is True:
        errors.append("spec.rayClusterConfig.authOptions.enableK8sTokenAuth: not supported for RayService")
    strategy = spec.get("upgradeStrategy") or {}
    kind = strategy.get("type")
    if kind is not None and kind not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        errors.append(
            f"spec.upgradeStrategy.type: {kind!r} is not NewClusterWithIncrementalUpgrade, NewCluster or None"
        )
    if kind != "NewClusterWithIncrementalUpgrade":
        return errors
    where = "spec.upgradeStrategy.clusterUpgradeOptions"
    if cluster.get("enableInTreeAutoscaling") is not True:
        errors.append("spec.rayClusterConfig.enableInTreeAutoscaling: NewClusterWithIncrementalUpgrade needs it true")
    options = strategy.get("clusterUpgradeOptions")
    if options is None:
        return errors + [f"{where}: required for NewClusterWithIncrementalUpgrade"]
    surge = options.get("maxSurgePercent", 100)
    step = options.get("stepSizePercent")
    if not 0 <= surge <= 100:
        errors.append(f"{where}.maxSurgePercent: must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        errors.append(f"{where}.stepSizePercent: must be between 0 and 100")
    elif step > surge:
        errors.append(f"{where}.stepSizePercent: must be <= maxSurgePercent ({surge})")
    if not options.get("intervalSeconds", 0) > 0:
        errors.append(f"{where}.intervalSeconds: must be greater than 0")
    if not options.get("gatewayClassName"):
        errors.append(f"{where}.gatewayClassName: required for NewClusterWithIncrementalUpgrade")
    return errors


def serve_schema_available() -> bool:
    """Whether serveConfigV2 can be checked: Ray's ServeDeploySchema needs ray, which a core install lacks."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _validate_serve_config(text: str) -> list[str]:
    if not serve_schema_available():
        return []  # the CLI says so once (serve_schema_available), rather than on every RayService
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    where = "spec.serveConfigV2"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: not valid YAML ({e})"]
    if not isinstance(data, dict):
        return [f"{where}: must be a YAML mapping (a Serve deploy config), got {type(data).__name__}"]
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        return [f"{where}.{_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    return []


def _validate_core(obj: dict[str, Any], k8s_version: str | None) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = k8s_version or latest_version()
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message} (Kubernetes {e.version}, strict)"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"kind: {e.message}"]
    return []


_KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "patches", "namespace", "images", "labels", "components",
    "secretGenerator", "configMapGenerator", "generatorOptions",
}
_GENERATOR_KEYS = {"name", "namespace", "behavior", "envs", "files", "literals", "options", "type"}
_GENERATOR_OPTION_KEYS = {"labels", "annotations", "disableNameSuffixHash", "immutable"}


def _validate_kustomization(obj: dict[str, Any]) -> list[str]:
    if (obj["apiVersion"], obj["kind"]) not in _KUSTOMIZE_KINDS:
        return [f"apiVersion: {obj['kind']} is {obj['apiVersion']}, kustomize wants "
                + " or ".join(f"{k} {v}" for v, k in sorted(_KUSTOMIZE_KINDS))]
    errors = [f"{k}: unknown {obj['kind']} field" for k in sorted(set(obj) - _KUSTOMIZATION_KEYS)]
    for field in ("secretGenerator", "configMapGenerator"):
        for i, gen in enumerate(obj.get(field) or []):
            where = f"{field}[{i}]"
            errors += [f"{where}.{k}: unknown generator field" for k in sorted(set(gen) - _GENERATOR_KEYS)]
            errors += [f"{where}.options.{k}: unknown generator option"
                       for k in sorted(set(gen.get("options") or {}) - _GENERATOR_OPTION_KEYS)]
            if "name" not in gen:
                errors.append(f"{where}: needs a name")
    return errors


def validate_manifest(obj: Any, *, crds: CrdsArg = None, k8s_version: str | None = None) -> list[str]:
    """Human-readable errors (each starting with the JSON path) for one manifest; [] when it is valid.

    Custom kinds (ray.io, gateway.networking.k8s.io, monitoring.coreos.com): their CRD's openAPIV3Schema as
    the API server applies it, then KubeRay's reconcile-time rules and, for RayServices, serveConfigV2 with
    Ray's ServeDeploySchema (when ray is installed). `crds` is a CrdSource, a folder or folders of CRD YAML, or
    None for $LLMSERVE_NB_CRDS. Kustomizations and Components: known fields. Other kinds: kubernetes-validate,
    strict. Raises ManifestError when no CRD source is given or a needed CRD is not in it.
    """
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["<root>: not a Kubernetes object (needs apiVersion and kind)"]
    obj = _drop_nulls(obj)
    if obj["apiVersion"].partition("/")[0] in CRD_GROUPS:
        return _validate_custom(obj, crds)
    if obj["kind"] in ("Kustomization", "Component"):
        return _validate_kustomization(obj)
    return _validate_core(obj, k8s_version)


def validation_report(
    manifests: dict[str, list[Any]], *, crds: CrdsArg = None
) -> list[dict[str, Any]]:
    """One row per object (file, kind, name, validated, errors). Missing CRDs mark ray.io objects
    `validated=False` with the reason, instead of raising, so a notebook can show the rest."""
    rows = []
    for path, docs in manifests.items():
        for doc in docs:
            if not (isinstance(doc, dict) and "apiVersion" in doc):
                continue  # e.g. the prometheus-adapter Helm values: not an API object
            try:
                errors, validated = validate_manifest(doc, crds=crds), True
            except ManifestError as e:
                errors, validated = [str(e)], False
            rows.append({"file": path, "kind": doc["kind"], "name": doc.get("metadata", {}).get("name", ""),
                         "validated": validated, "errors": errors})
    return rows


def _kustomize_refs(path: Path, kustomization: dict[str, Any]) -> list[str]:
    refs = list(kustomization.get("resources", [])) + [
        p["path"] for p in kustomization.get("patches", []) if "path" in p
    ]
    errors = []
    for ref in refs:
        target = path.parent / ref
        if not (target.is_file() or (target / "kustomization.yaml").is_file()):
            errors.append(f"{path}: refers to {ref!r}, which is neither a file nor a folder with kustomization.yaml")
    for ref in kustomization.get("components", []):
        target = path.parent / ref / "kustomization.yaml"
        kind = (_yaml_mapping(target) or {}).get("kind")
        if kind != "Component":
            errors.append(f"{path}: component {ref!r} is not a folder whose kustomization.yaml is a Component")
    for gen in kustomization.get("secretGenerator", []) + kustomization.get("configMapGenerator", []):
        for ref in gen.get("envs", []) + [f.partition("=")[2] or f for f in gen.get("files", [])]:
            errors += _generator_input_error(path, ref)
    return errors


def _yaml_mapping(path: Path) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def _generator_input_error(kustomization: Path, ref: str) -> list[str]:
    """A generator input exists, or is a secret the operator creates: git-ignored, with a committed template."""
    target = kustomization.parent / ref
    if target.is_file():
        return []
    example = target.with_name(target.name + ".example")
    ignore = target.parent / ".gitignore"
    ignored = ignore.is_file() and target.name in ignore.read_text().splitlines()
    if example.is_file() and ignored:
        return []
    return [
        f"{kustomization}: generator input {ref!r} is missing"
        + ("" if example.is_file() else f", and there is no {example.name} telling how to create it")
        + ("" if ignored else f", and {ignore} does not ignore it")
    ]


def validate_files(paths: list[str | Path], *, crds: CrdsArg = None) -> list[str]:
    """Validate every document of YAML files or folders (recursively). Patches and Helm values are checked
    through the kustomization that uses them, not on their own."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.yaml")) if p.is_dir() else [p]
    errors = []
    for f in files:
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            errors.append(f"{f}: cannot read ({e})")
            continue
        for i, doc in enumerate(docs):
            if not (isinstance(doc, dict) and "apiVersion" in doc):
                continue
            errors += [
                f"{f}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name', '')}: {m}"
                for m in validate_manifest(doc, crds=crds)
            ]
            if doc.get("kind") in ("Kustomization", "Component"):
                errors += _kustomize_refs(f, doc)
    return errors
