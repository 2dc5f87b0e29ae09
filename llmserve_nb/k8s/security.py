"""Secrets and Ray token auth: the API-key Secret and the optional Hugging Face token Secret, each generated from
a git-ignored file with a committed template; KubeRay `authOptions`, and where KubeRay keeps the Ray auth token.
"""

from __future__ import annotations

from typing import Any

from llmserve_nb.k8s.options import (
    API_KEY_ENV,
    API_KEY_SECRET_KEY,
    HEADER,
    HF_TOKEN_ENV,
    HF_TOKEN_SECRET_KEY,
    NAME_LABEL,
    ClusterSpec,
)

API_KEY_FILE = "api-key.env"
HF_TOKEN_FILE = "hf-token.env"
# KubeRay v1.7, ray-operator/controllers/ray/utils/constant.go: RAY_AUTH_TOKEN_SECRET_KEY, RAY_AUTH_TOKEN_ENV_VAR.
RAY_AUTH_TOKEN_KEY = "auth_token"
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_CHECK_NAME_MAX = 50  # utils.CheckName keeps the last 50 characters, leaving room for "-head-"/"-worker-" suffixes


def auth_token_secret_name(cluster_name: str) -> tuple[str, str]:
    """(Secret name, data key) holding the Ray auth token KubeRay v1.7 generates for RayCluster `cluster_name`.

    KubeRay creates it when `authOptions.mode` is `token` and no `authOptions.secretName` is set
    (RayClusterReconciler.reconcileAuthSecret in ray-operator/controllers/ray/raycluster_controller.go):
    named `utils.CheckName(<RayCluster name>)`, key `auth_token`, owned by (and deleted with) the RayCluster.
    For a RayService pass its *active RayCluster's* name (`status.activeServiceStatus.rayClusterName`,
    `<rayservice>-<5 random chars>`): every new cluster of an upgrade gets a Secret and a token of its own.
    """
    if not cluster_name:
        raise ValueError("cluster_name is empty: pass the RayCluster's metadata.name")
    name = cluster_name[-_CHECK_NAME_MAX:]
    # CheckName replaces a leading digit or punctuation character, which a Kubernetes name cannot start with.
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name, RAY_AUTH_TOKEN_KEY


def auth_options(spec: ClusterSpec) -> dict[str, Any] | None:
    """`authOptions` of a RayCluster spec: token mode, with KubeRay generating the token Secret per cluster."""
    return {"mode": "token"} if spec.ray_token_auth else None


def token_env(cluster_name: str) -> list[dict[str, Any]]:
    """The env KubeRay injects into its own pods under token auth, for Ray pods it does not manage (HPA workers)."""
    secret, key = auth_token_secret_name(cluster_name)
    return [
        {"name": RAY_AUTH_MODE_ENV, "value": "token"},
        {"name": RAY_AUTH_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
    ]


def secret_generator(name: str, env_file: str) -> dict[str, Any]:
    """A kustomize `secretGenerator` reading a git-ignored env file (the namespace comes from the kustomization).

    `kubectl apply -k` fails while the file is missing, so no known placeholder value can be deployed.
    The name hash suffix is off: kustomize rewrites Secret references only in kinds it knows, not inside
    KubeRay's RayService/RayCluster pod templates, which would keep pointing at the unhashed name.
    """
    return {
        "name": name,
        "envs": [env_file],
        "type": "Opaque",
        "options": {"disableNameSuffixHash": True, "labels": dict(NAME_LABEL)},
    }


def api_key_generator(spec: ClusterSpec) -> dict[str, Any]:
    return secret_generator(spec.api_key_secret, API_KEY_FILE)


def hf_token_generator(spec: ClusterSpec) -> dict[str, Any]:
    return secret_generator(spec.hf_token_secret, HF_TOKEN_FILE)


def api_key_env_example(spec: ClusterSpec, folder: str = "k8s/base") -> str:
    return HEADER + (
        "#\n"
        f"# Template of {API_KEY_FILE}, which `kubectl apply -k` needs and git ignores. Create that file with a\n"
        "# strong random key of your own (never one copied from anywhere, this file included):\n"
        "#\n"
        f"#   umask 077; printf '{API_KEY_SECRET_KEY}=%s\\n' \"$(openssl rand -hex 32)\" > {folder}/{API_KEY_FILE}\n"
        "#\n"
        f"# It becomes Secret {spec.api_key_secret} (key `{API_KEY_SECRET_KEY}`) in the kustomization's namespace,\n"
        f"# which every Ray pod reads into ${API_KEY_ENV} when it starts; clients send `Authorization: Bearer <key>`.\n"
        "# Copied unchanged, this file defines no key and the Ray pods refuse to start\n"
        f"# (CreateContainerConfigError: couldn't find key {API_KEY_SECRET_KEY}); an empty value would turn the\n"
        "# API-key check off. Rotating the key: see k8s/README.md.\n"
    )


def hf_token_env_example(spec: ClusterSpec, folder: str = "k8s/components/hf-token") -> str:
    return HEADER + (
        "#\n"
        f"# Template of {HF_TOKEN_FILE}, needed only by this Component (for gated or private Hugging Face models)\n"
        "# and ignored by git. Create it with a read-only token of your own (https://huggingface.co/settings/tokens):\n"
        "#\n"
        f"#   umask 077; printf '{HF_TOKEN_SECRET_KEY}=%s\\n' \"$HF_TOKEN\" > {folder}/{HF_TOKEN_FILE}\n"
        "#\n"
        f"# It becomes Secret {spec.hf_token_secret} (key `{HF_TOKEN_SECRET_KEY}`), which the Ray workers read into\n"
        f"# ${HF_TOKEN_ENV} when they start. The reference is optional: without the Secret (or without this\n"
        "# Component) pods start and download public models anonymously. Or create the Secret any other way:\n"
        f"#   kubectl -n NAMESPACE create secret generic {spec.hf_token_secret} \\\n"
        f"#     --from-literal={HF_TOKEN_SECRET_KEY}=\"$HF_TOKEN\"\n"
    )


def gitignore(*names: str) -> str:
    return HEADER + "".join(f"{n}\n" for n in names)
