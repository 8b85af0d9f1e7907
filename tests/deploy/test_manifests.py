"""Offline checks of deploy/: the kustomize overlays and the Dockerfiles.

Each overlay is rendered with `kubectl kustomize`, validated against the Kubernetes schemas
with kubernetes-validate (strict: unknown fields are errors) when it is installed, and
checked against the project's policies: GPU limits, vLLM probes and /dev/shm, Redis AOF and
PVC, pod hardening, resources, real `sentinel` subcommands, settings that validate, network
paths, and the KEDA autoscaling of the Celery workers (targets, queue keys, credentials).
checkov runs on the rendered overlays when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from sentinel.cli import app
from sentinel.config import Settings, load_settings
from sentinel.serving.server import COMPACT_JSON, LOGPROBS_MODE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["gpu-cluster", "dev"]
KUBERNETES_VERSION = "1.30.0"  # a schema version kubernetes-validate ships
OUR_IMAGES = {"sentinel-app", "sentinel-trainer"}  # built from deploy/docker/*.Dockerfile
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
PART_OF = "app.kubernetes.io/part-of"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
NOT_SETTINGS = {"SENTINEL_CONFIG"}  # read by load_settings itself, not a field
PLACEHOLDER = "CHANGE-ME"
# Custom resources: kubernetes-validate ships only the built-in schemas, so these kinds are
# not schema-validated; the KEDA tests below check their fields, targets and references.
KEDA_API = "keda.sh/v1alpha1"
CUSTOM_KINDS = {(KEDA_API, "ScaledObject"), (KEDA_API, "TriggerAuthentication")}

Doc = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# rendering and walking the manifests


def render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the kustomize overlays cannot be rendered")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_RENDERED: dict[str, list[Doc]] = {}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def docs(overlay: str) -> list[Doc]:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = render(overlay)
    return _RENDERED[overlay]


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next(
        (d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name),
        None,
    )


def get(docs: list[Doc], kind: str, name: str) -> Doc:
    doc = find(docs, kind, name)
    assert doc is not None, f"{kind}/{name} is not rendered"
    return doc


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(workload id, pod template) for every workload."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield ident(doc), doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield ident(doc), doc["spec"]["jobTemplate"]["spec"]["template"]
        elif doc["kind"] == "Pod":
            yield ident(doc), doc


def containers(pod: Doc) -> list[Doc]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def all_containers(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(workload id, pod template, container) for every container, init containers too."""
    for name, pod in pod_templates(docs):
        for container in containers(pod):
            yield f"{name}/{container['name']}", pod, container


def image_name(image: str) -> str:
    """`registry/path/sentinel-app:0.1.0` -> `sentinel-app`."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def ours(container: Doc) -> bool:
    return image_name(container["image"]) in OUR_IMAGES


def container_of(docs: list[Doc], kind: str, name: str, container: str) -> tuple[Doc, Doc]:
    pod = get(docs, kind, name)["spec"]["template"]
    for c in containers(pod):
        if c["name"] == container:
            return pod, c
    raise AssertionError(f"{kind}/{name} has no container {container}")


def env_value(container: Doc, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            value: str | None = var.get("value")
            return value
    return None


def mount_for(pod: Doc, container: Doc, path: str) -> tuple[Doc, Doc] | None:
    """The (volumeMount, volume) whose mountPath holds `path`, deepest first."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        root = mount["mountPath"].rstrip("/") + "/"
        if (path.rstrip("/") + "/").startswith(root):
            return mount, volumes.get(mount["name"], {})  # {}: a volumeClaimTemplate
    return None


def settings_yaml(docs: list[Doc]) -> dict[str, Any]:
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("sentinel-config")
    ]
    assert len(maps) == 1, f"expected one sentinel-config ConfigMap, got {len(maps)}"
    data = yaml.safe_load(maps[0]["data"]["sentinel.yaml"])
    assert isinstance(data, dict), "sentinel.yaml must be a mapping"
    return data


# ---------------------------------------------------------------------------------------------
# rendering, labels and schema


def test_overlay_renders_the_components(overlay: str, docs: list[Doc]) -> None:
    expected = {
        "Namespace/sentinel",
        "Secret/sentinel-secrets",
        "StatefulSet/sentinel-redis",
        "Service/sentinel-redis",
        "PodDisruptionBudget/sentinel-redis",
        "Deployment/sentinel-monitor",
        "Deployment/sentinel-trainer",
        "Deployment/sentinel-controller",
        "Deployment/sentinel-proposer",
        "Deployment/sentinel-orchestrator",
        "Deployment/sentinel-worker-validate",
        "Deployment/sentinel-worker-rollout",
        "ScaledObject/sentinel-worker-validate",
        "ScaledObject/sentinel-worker-rollout",
        "TriggerAuthentication/sentinel-redis",
        "PersistentVolumeClaim/sentinel-shared",
        "NetworkPolicy/default-deny",
    }
    if overlay == "gpu-cluster":
        expected |= {"Deployment/sentinel-vllm", "Service/sentinel-vllm"}
    rendered = {ident(d) for d in docs}
    assert expected <= rendered, f"missing: {sorted(expected - rendered)}"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert all(d["metadata"].get("namespace") == "sentinel" for d in namespaced)


def test_every_object_and_pod_is_labelled_part_of_sentinel(docs: list[Doc]) -> None:
    unlabelled = [
        ident(d) for d in docs if d["metadata"].get("labels", {}).get(PART_OF) != "sentinel"
    ]
    unlabelled += [
        f"{name} pod template"
        for name, pod in pod_templates(docs)
        if pod["metadata"].get("labels", {}).get(PART_OF) != "sentinel"
    ]
    for doc in docs:
        for claim in doc.get("spec", {}).get("volumeClaimTemplates", []):
            if claim["metadata"].get("labels", {}).get(PART_OF) != "sentinel":
                unlabelled.append(f"{ident(doc)} volumeClaimTemplate {claim['metadata']['name']}")
    assert not unlabelled, f"without {PART_OF}=sentinel: {unlabelled}"


def test_manifests_validate_strictly_against_the_kubernetes_schemas(docs: list[Doc]) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    import kubernetes_validate

    errors = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate: see test_keda_objects_use_known_fields
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{ident(doc)}: {error.message} at {list(error.path)}")
    assert not errors, "\n".join(errors)


def test_references_resolve(docs: list[Doc]) -> None:
    """Every PVC, ConfigMap, Secret key and Service selector used exists in the overlay."""
    problems = []
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    secrets = {
        d["metadata"]["name"]: {*d.get("stringData", {}), *d.get("data", {})}
        for d in docs
        if d["kind"] == "Secret"
    }
    for name, pod in pod_templates(docs):
        for volume in pod["spec"].get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{name}: PVC {claim} is not rendered")
            config = volume.get("configMap", {}).get("name")
            if config is not None and config not in maps:
                problems.append(f"{name}: ConfigMap {config} is not rendered")
        for container in containers(pod):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], set()):
                    problems.append(f"{name}: secret {ref['name']}/{ref['key']} is not rendered")
    pods = [pod["metadata"].get("labels", {}) for _, pod in pod_templates(docs)]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"].get("selector", {})
        if not any(selector.items() <= labels.items() for labels in pods):
            problems.append(f"{ident(service)} selects no pod")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# GPU, vLLM, Redis


def test_every_gpu_container_has_a_gpu_limit(docs: list[Doc]) -> None:
    for name, _, container in all_containers(docs):
        resources = container.get("resources", {})
        if "nvidia.com/gpu" in resources.get("requests", {}):
            assert "nvidia.com/gpu" in resources.get("limits", {}), f"{name}: GPU not in limits"
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]


def test_gpu_cluster_gives_vllm_and_the_trainer_one_gpu() -> None:
    docs = _RENDERED.get("gpu-cluster") or render("gpu-cluster")
    for workload, container in (("sentinel-vllm", "vllm"), ("sentinel-trainer", "trainer")):
        _, c = container_of(docs, "Deployment", workload, container)
        assert c["resources"]["limits"].get("nvidia.com/gpu") == 1, workload


def test_dev_asks_for_no_gpu_and_runs_no_vllm() -> None:
    docs = _RENDERED.get("dev") or render("dev")
    gpus = [n for n, _, c in all_containers(docs) if "nvidia.com/gpu" in str(c.get("resources"))]
    assert not gpus, f"dev containers asking for a GPU: {gpus}"
    assert find(docs, "Deployment", "sentinel-vllm") is None


def test_vllm_has_health_probes_shm_lora_and_volumes() -> None:
    docs = _RENDERED.get("gpu-cluster") or render("gpu-cluster")
    pod, vllm = container_of(docs, "Deployment", "sentinel-vllm", "vllm")
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"]), vllm["image"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm.get(probe, {}).get("httpGet", {}).get("path") == "/health", probe
    shm = mount_for(pod, vllm, "/dev/shm")
    assert shm is not None, "no /dev/shm mount"
    assert shm[0]["mountPath"] == "/dev/shm", "no /dev/shm mount"
    assert shm[1].get("emptyDir", {}).get("medium") == "Memory", "/dev/shm is not in memory"
    args = vllm.get("args", [])
    assert "--enable-lora" in args
    assert any(a.startswith("--max-lora-rank") for a in args)
    assert f"--logprobs-mode={LOGPROBS_MODE}" in args  # as `sentinel serve` runs it
    assert set(COMPACT_JSON) <= set(args)
    assert env_value(vllm, "VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"
    claims = {
        m["mountPath"]: (v["persistentVolumeClaim"]["claimName"], m.get("readOnly", False))
        for m in vllm["volumeMounts"]
        for v in pod["spec"]["volumes"]
        if v["name"] == m["name"] and "persistentVolumeClaim" in v
    }
    assert ("sentinel-shared", True) in claims.values(), "adapter volume not mounted read-only"
    assert any(claim == "sentinel-models" for claim, _ in claims.values()), "no model volume"
    shared = get(docs, "PersistentVolumeClaim", "sentinel-shared")
    assert "ReadWriteMany" in shared["spec"]["accessModes"]


def test_redis_has_aof_a_pvc_an_acl_file_probes_and_a_pdb(docs: list[Doc]) -> None:
    redis = get(docs, "StatefulSet", "sentinel-redis")
    pod, container = container_of(docs, "StatefulSet", "sentinel-redis", "redis")
    assert re.fullmatch(r"redis:7\.2\.\d+(-\w+)?", container["image"]), container["image"]
    line = [*container.get("command", []), *container.get("args", [])]
    assert line[line.index("--appendonly") + 1] == "yes", "AOF is off"
    assert "--requirepass" not in line, "a password on redis-server's command line"
    acl = mount_for(pod, container, line[line.index("--aclfile") + 1])
    assert acl is not None, "the ACL file is not mounted"
    assert acl[1].get("emptyDir", {}).get("medium") == "Memory", "the ACL file is not in memory"
    _, render = container_of(docs, "StatefulSet", "sentinel-redis", "acl")
    assert any(m["name"] == acl[0]["name"] for m in render["volumeMounts"]), "nothing writes it"
    claims = {c["metadata"]["name"] for c in redis["spec"].get("volumeClaimTemplates", [])}
    data = mount_for(pod, container, "/data")
    assert data is not None, "/data is not mounted"
    assert data[0]["name"] in claims, "/data is not on a volumeClaimTemplate"
    assert line[line.index("--dir") + 1] == "/data"
    assert "readinessProbe" in container
    assert "livenessProbe" in container
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    labels = pod["metadata"]["labels"]
    assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), (
        "no PodDisruptionBudget covers Redis"
    )


# ---------------------------------------------------------------------------------------------
# pod hardening and resources


def test_every_pod_is_hardened(docs: list[Doc]) -> None:
    problems = []
    for name, pod, container in all_containers(docs):
        pod_ctx = pod["spec"].get("securityContext", {})
        ctx = container.get("securityContext", {})

        def effective(key: str, ctx: Doc = ctx, pod_ctx: Doc = pod_ctx) -> Any:
            return ctx.get(key, pod_ctx.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if not isinstance(effective("runAsUser"), int) or effective("runAsUser") == 0:
            problems.append(f"{name}: runAsUser is not a non-zero UID")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if ctx.get("capabilities", {}).get("add"):
            problems.append(f"{name}: adds capabilities")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        tmp = mount_for(pod, container, "/tmp")
        if tmp is None or tmp[0]["mountPath"] != "/tmp":
            problems.append(f"{name}: no writable /tmp on a read-only root filesystem")
    for name, pod in pod_templates(docs):
        if pod["spec"].get("hostNetwork") or pod["spec"].get("hostPID"):
            problems.append(f"{name}: shares a host namespace")
    assert not problems, "\n".join(problems)


def test_every_container_has_requests_and_limits(docs: list[Doc]) -> None:
    problems = []
    for name, _, container in all_containers(docs):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind, {}))
            if missing:
                problems.append(f"{name}: no {kind} for {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_every_image_is_pinned(docs: list[Doc]) -> None:
    for name, _, container in all_containers(docs):
        image = container["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: {image} is not pinned"


# ---------------------------------------------------------------------------------------------
# sentinel command lines and settings


def check_sentinel_line(line: list[str]) -> str:
    """Parse `sentinel <line>` with the real CLI; return the subcommand path, raise if bad."""
    command: Any = typer.main.get_command(app)  # typer vendors click: duck-type it
    path = []
    args = list(line)
    while hasattr(command, "commands"):  # a group
        # the group's own options come first (`--config x`, `--log-format json`)
        while args and args[0].startswith("-"):
            option = args.pop(0).split("=", 1)
            param = next((p for p in command.params if option[0] in p.opts), None)
            assert param is not None, (
                f"unknown option {option[0]} of {' '.join(path) or 'sentinel'}"
            )
            if len(option) == 1 and not getattr(param, "is_flag", False):
                assert args, f"{option[0]} needs a value"
                args.pop(0)
        assert args, f"`sentinel {' '.join(line)}` names no subcommand"
        name = args.pop(0)
        commands = command.commands
        assert name in commands, f"`{name}` is not a sentinel subcommand: {sorted(commands)}"
        path.append(name)
        command = commands[name]
    try:  # parses options and arguments as the real command would, without running it
        command.make_context(" ".join(["sentinel", *path]), args)
    except Exception as error:
        raise AssertionError(f"`sentinel {' '.join(line)}`: {error}") from error
    return " ".join(path)


def test_the_cli_check_refuses_what_is_not_a_subcommand() -> None:
    assert check_sentinel_line(["--log-format", "json", "dlq", "list", "trajectories"])
    for bad in (["conductor"], ["monitor", "--nope"], ["--verbose", "monitor"], ["worker"], []):
        with pytest.raises(AssertionError):
            check_sentinel_line(bad)


def test_every_sentinel_command_line_is_a_real_subcommand(docs: list[Doc]) -> None:
    lines = 0
    for name, _, container in all_containers(docs):
        if not ours(container):
            continue
        command = container.get("command", ["sentinel"])
        assert command == ["sentinel"], f"{name}: command {command} bypasses the entrypoint"
        args = [str(a) for a in container.get("args", [])]
        assert args, f"{name}: no args; the image's default CMD is implicit"
        check_sentinel_line(args)
        lines += 1
    assert lines >= 1, "no container runs a SENTINEL image"


def test_the_configmap_settings_validate(docs: list[Doc]) -> None:
    data = settings_yaml(docs)

    def walk(values: dict[str, Any], model: type[Any], where: str) -> None:
        for key, value in values.items():
            assert key in model.model_fields, f"{where}{key} is not a Settings field"
            annotation = model.model_fields[key].annotation
            if isinstance(value, dict) and hasattr(annotation, "model_fields"):
                walk(value, annotation, f"{where}{key}.")

    walk(data, Settings, "")
    Settings.model_validate(data)  # the whole file, types and cross-field checks included


def settings_field(name: str) -> bool:
    """Does SENTINEL_A__B name the Settings field a.b?"""
    model: Any = Settings
    parts = name.removeprefix("SENTINEL_").lower().split("__")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
        if i < len(parts) - 1 and not hasattr(model, "model_fields"):
            return False
    return True


def test_settings_field_lookup_refuses_unknown_names() -> None:
    assert settings_field("SENTINEL_LLM__POLICY__BASE_URL")
    assert settings_field("SENTINEL_RUN_DIR")
    assert not settings_field("SENTINEL_LLM_API_KEY")
    assert not settings_field("SENTINEL_RUN_DIR__X")
    assert not settings_field("SENTINEL_BUS__NOPE")


def test_every_sentinel_env_var_is_a_settings_field(docs: list[Doc]) -> None:
    bad = [
        f"{name}: {var['name']}"
        for name, _, container in all_containers(docs)
        for var in container.get("env", [])
        if var["name"].startswith("SENTINEL_")
        and var["name"] not in NOT_SETTINGS
        and not settings_field(var["name"])
    ]
    assert not bad, f"SENTINEL_* variables that are not Settings fields: {bad}"


def test_each_sentinel_container_loads_its_settings(
    docs: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings each pod sees: the mounted file plus its SENTINEL_* variables."""
    config = tmp_path / "sentinel.yaml"
    config.write_text(yaml.safe_dump(settings_yaml(docs)))
    for name, pod, container in all_containers(docs):
        if not ours(container):
            continue
        path = env_value(container, "SENTINEL_CONFIG")
        assert path is not None, f"{name}: SENTINEL_CONFIG is not set"
        mount = mount_for(pod, container, path)
        assert mount is not None, f"{name}: {path} is not mounted"
        assert mount[1].get("configMap", {}).get("name", "").startswith("sentinel-config")
        assert path == mount[0]["mountPath"].rstrip("/") + "/sentinel.yaml"
        with monkeypatch.context() as env:
            for key in [k for k in os.environ if k.startswith("SENTINEL_")]:
                env.delenv(key)
            for var in container.get("env", []):
                if var["name"].startswith("SENTINEL_") and var["name"] not in NOT_SETTINGS:
                    value = re.sub(r"\$\((\w+)\)", "x", var.get("value", ""))
                    env.setenv(var["name"], value)
            settings = load_settings(config)
        assert settings.redis_url is not None, f"{name}: no redis_url"
        assert settings.redis_url.startswith("redis://"), name
        assert "sentinel-redis" in settings.redis_url, f"{name}: Redis is not the in-cluster one"


def test_the_gpu_cluster_pieces_agree() -> None:
    """vLLM's flags, the trainer's volumes and the settings describe the same deployment."""
    docs = _RENDERED.get("gpu-cluster") or render("gpu-cluster")
    settings = Settings.model_validate(settings_yaml(docs))
    vpod, vllm = container_of(docs, "Deployment", "sentinel-vllm", "vllm")
    tpod, trainer = container_of(docs, "Deployment", "sentinel-trainer", "trainer")
    flags = dict(a.removeprefix("--").split("=", 1) for a in vllm["args"] if "=" in a)
    assert flags["served-model-name"] == settings.serve.served_model_name
    assert settings.llm.policy.model == settings.serve.served_model_name
    assert int(flags["max-lora-rank"]) == settings.serve.max_lora_rank
    assert int(flags["max-loras"]) == settings.serve.max_loras  # checked against max_staleness
    assert settings.trainer.lora_rank <= settings.serve.max_lora_rank
    assert str(settings.trainer.model_dir) == flags["model"], "trainer and vLLM differ in model"
    service = get(docs, "Service", "sentinel-vllm")
    port = service["spec"]["ports"][0]["port"]
    assert settings.llm.policy.base_url == f"http://sentinel-vllm:{port}/v1"
    run_dir = env_value(trainer, "SENTINEL_RUN_DIR") or str(settings.run_dir)
    adapters = str(settings.trainer.adapter_dir or f"{run_dir}/adapters")
    assert env_value(vllm, "VLLM_LORA_RESOLVER_CACHE_DIR") == adapters
    for pod, container, writable in ((tpod, trainer, True), (vpod, vllm, False)):
        mount = mount_for(pod, container, adapters)
        assert mount is not None, f"{container['name']} does not see {adapters}"
        assert mount[1]["persistentVolumeClaim"]["claimName"] == "sentinel-shared"
        assert mount[0].get("readOnly", False) is not writable
        model = mount_for(pod, container, flags["model"])
        assert model is not None, f"{container['name']} does not see {flags['model']}"
        assert model[1]["persistentVolumeClaim"]["claimName"] == "sentinel-models"


def test_the_secret_is_a_template(docs: list[Doc]) -> None:
    secret = get(docs, "Secret", "sentinel-secrets")
    assert "data" not in secret, "committed base64 data: use stringData placeholders"
    values = secret.get("stringData", {})
    assert values, "the Secret template is empty"
    real = [k for k, v in values.items() if not str(v).startswith(PLACEHOLDER)]
    assert not real, f"values that are not {PLACEHOLDER} placeholders: {real}"


# ---------------------------------------------------------------------------------------------
# network policies


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr.get("values", []):
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def allows(
    policies: list[Doc], direction: str, pod: dict[str, str], peer: dict[str, str] | None, port: int
) -> bool:
    """Does traffic pass `direction` (Ingress/Egress) at `pod` from/to `peer` (None: outside
    the namespace) on TCP/UDP `port`? Unselected pods are not isolated."""
    field, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    chosen = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], pod)
    ]
    if not chosen:
        return True
    for policy in chosen:
        for rule in policy["spec"].get(field, []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, None) for p in ports):
                continue
            peers = rule.get(peers_key)
            if not peers:
                return True
            for item in peers:
                if peer is None and "ipBlock" in item:
                    return True
                if (
                    peer is not None
                    and "podSelector" in item
                    and "namespaceSelector" not in item
                    and selects(item["podSelector"], peer)
                ):
                    return True
    return False


def reachable(policies: list[Doc], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    return allows(policies, "Egress", src, dst, port) and allows(
        policies, "Ingress", dst, src, port
    )


OUTSIDE = "outside"  # a destination outside the namespace (the evaluator's ipBlocks)
DNS = 53


def pod_labels(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """Workload name -> its pods' labels."""
    return {name.split("/")[1]: pod["metadata"]["labels"] for name, pod in pod_templates(docs)}


def probe_ports(docs: list[Doc]) -> set[int]:
    """The ports worth probing: every container and Service port, and the usual suspects."""
    ports = {80, 443, 6379, 8000, 8080}
    for _, _, container in all_containers(docs):
        ports |= {p["containerPort"] for p in container.get("ports", [])}
    for service in (d for d in docs if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            ports |= {p for p in (port["port"], port.get("targetPort")) if isinstance(p, int)}
    return ports - {DNS}


def destinations(
    policies: list[Doc], source: str, pods: dict[str, dict[str, str]], ports: set[int]
) -> set[tuple[str, int]]:
    """Where the pods of workload `source` may open connections, DNS aside:
    (workload, port) in the namespace, (OUTSIDE, port) beyond it."""
    src = pods[source]
    found = {
        (name, port)
        for name, labels in pods.items()
        if name != source
        for port in ports
        if reachable(policies, src, labels, port)
    }
    return found | {(OUTSIDE, p) for p in ports if allows(policies, "Egress", src, None, p)}


def endpoint(docs: list[Doc], url: str) -> tuple[str, int]:
    """(workload, pod port) behind an in-cluster Service URL, else (OUTSIDE, port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for service in (d for d in docs if d["kind"] == "Service"):
        name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
        suffixes = ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")
        if host not in {name + suffix for suffix in suffixes}:
            continue
        spec = next((p for p in service["spec"]["ports"] if p["port"] == port), None)
        assert spec is not None, f"{url}: Service {name} has no port {port}"
        for workload, pod in pod_templates(docs):
            if service["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
                target = spec.get("targetPort", port)
                if isinstance(target, str):  # a named container port
                    target = next(
                        p["containerPort"]
                        for c in containers(pod)
                        for p in c.get("ports", [])
                        if p.get("name") == target
                    )
                return workload.split("/")[1], int(target)
        raise AssertionError(f"{url}: Service {name} selects no pod")
    return OUTSIDE, port


def test_network_policy_evaluator_is_not_vacuous() -> None:
    deny = {"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    assert reachable([], {"a": "1"}, {"b": "1"}, 80)
    assert not reachable([deny], {"a": "1"}, {"b": "1"}, 80)
    pods = {"a": {"a": "1"}, "b": {"b": "1"}}
    assert destinations([], "a", pods, {80}) == {("b", 80), (OUTSIDE, 80)}
    assert destinations([deny], "a", pods, {80}) == set()


def test_network_policies_deny_by_default_and_allow_only_what_is_needed(
    overlay: str, docs: list[Doc]
) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = get(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress")
    assert not deny.get("egress")
    pods = pod_labels(docs)
    redis, monitor, trainer = (
        pods["sentinel-redis"],
        pods["sentinel-monitor"],
        pods["sentinel-trainer"],
    )
    stranger = {PART_OF: "sentinel", "app.kubernetes.io/name": "stranger"}
    assert reachable(policies, monitor, redis, 6379)
    assert reachable(policies, trainer, redis, 6379)
    assert not reachable(policies, stranger, redis, 6379)
    assert not reachable(policies, monitor, trainer, 8000)
    assert not reachable(policies, redis, monitor, 6379)
    assert not allows(policies, "Egress", redis, None, 443), "Redis reaches outside"
    assert not allows(policies, "Egress", monitor, None, 443), "the monitor reaches outside"
    assert not allows(policies, "Egress", trainer, None, 443), "the trainer reaches outside"
    for name, labels in pods.items():
        assert allows(policies, "Egress", labels, None, 53), f"{name} cannot resolve DNS"
    validate = pods["sentinel-worker-validate"]
    assert reachable(policies, validate, redis, 6379)
    for port in (443, 80, 8000, 6379):  # untrusted replays: Redis and DNS, nothing else
        assert not allows(policies, "Egress", validate, None, port), f"validation reaches :{port}"
    for name, labels in pods.items():
        if name != "sentinel-redis":
            assert not reachable(policies, validate, labels, 8000), f"validation reaches {name}"
    for agent in ("sentinel-controller", "sentinel-proposer"):
        assert reachable(policies, pods[agent], redis, 6379)
        assert allows(policies, "Egress", pods[agent], None, 443), f"{agent}: no external LLM"
    # The orchestrator evaluates policies itself: Redis and the policy endpoints, nothing else.
    settings = Settings.model_validate(settings_yaml(docs))
    policy = {endpoint(docs, e.base_url) for e in (settings.llm.policy, settings.llm.user_sim)}
    assert destinations(policies, "sentinel-orchestrator", pods, probe_ports(docs)) == {
        ("sentinel-redis", 6379),
        *policy,
    }
    if overlay == "gpu-cluster":
        vllm = pods["sentinel-vllm"]
        assert reachable(policies, trainer, vllm, 8000)
        assert not reachable(policies, monitor, vllm, 8000)
        assert not reachable(policies, stranger, vllm, 8000)
        assert not reachable(policies, vllm, redis, 6379)


def test_rollout_workers_reach_only_redis_dns_and_the_policy_server(
    overlay: str, docs: list[Doc]
) -> None:
    """The rollout workers talk to Redis, the policy (llm.policy) and the user simulator
    (llm.user_sim): in the GPU cluster both are the in-cluster vLLM on 8000; in dev, where
    there is no vLLM, the external HTTPS endpoint of dev/sentinel.yaml."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = pod_labels(docs)
    worker = pods["sentinel-worker-rollout"]
    settings = Settings.model_validate(settings_yaml(docs))
    policy = {endpoint(docs, e.base_url) for e in (settings.llm.policy, settings.llm.user_sim)}
    if overlay == "gpu-cluster":
        assert policy == {("sentinel-vllm", 8000)}, "the policy is not the in-cluster vLLM"
    else:
        assert policy == {(OUTSIDE, 443)}, "dev's policy is an external HTTPS endpoint"
    assert allows(policies, "Egress", worker, None, DNS), "rollout workers cannot resolve DNS"
    assert destinations(policies, "sentinel-worker-rollout", pods, probe_ports(docs)) == {
        ("sentinel-redis", 6379),
        *policy,
    }
    for name, labels in pods.items():  # and nothing reaches them
        assert not reachable(policies, labels, worker, 8000), f"{name} reaches rollout workers"


# ---------------------------------------------------------------------------------------------
# KEDA: autoscaling of the Celery workers

SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
REDIS_SCALER = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "username", "usernameFromEnv", "passwordFromEnv", "listName", "listLength",
    "activationListLength",
    "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip
TRIGGER_AUTH_SPEC = {
    "secretTargetRef", "env", "configMapTargetRef", "podIdentity", "hashiCorpVault",
    "azureKeyVault", "awsSecretManager", "gcpSecretManager", "boundServiceAccountToken",
}  # fmt: skip
# What `sentinel worker <name>` consumes, and how many replicas at least (validation comes
# in bursts: none while idle; the loop always has rollouts queued: one stays warm).
WORKER_MIN_REPLICAS = {"validate": 0, "rollout": 1}


def scaled_objects(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if (d["apiVersion"], d["kind"]) == (KEDA_API, "ScaledObject")]


def worker_queue(container: Doc) -> str | None:
    """`validate` for a container running `sentinel worker validate ...`, else None."""
    args = [str(a) for a in container.get("args", [])]
    return args[1] if ours(container) and args[:1] == ["worker"] and len(args) > 1 else None


def scale_target(docs: list[Doc], scaled: Doc) -> tuple[Doc, Doc, str]:
    """(Deployment, its worker container, the queue it consumes) a ScaledObject scales."""
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment", f"{ident(scaled)}: not a Deployment"
    assert ref.get("apiVersion", "apps/v1") == "apps/v1", ident(scaled)
    target = find(docs, "Deployment", ref["name"])
    assert target is not None, f"{ident(scaled)} scales Deployment/{ref['name']}: not rendered"
    workers = [(c, q) for c in containers(target["spec"]["template"]) if (q := worker_queue(c))]
    assert len(workers) == 1, f"{ident(scaled)}: {ref['name']} runs no `sentinel worker`"
    return target, *workers[0]


def redis_trigger(scaled: Doc) -> Doc:
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis"], f"{ident(scaled)}: one redis trigger"
    trigger: Doc = triggers[0]
    return trigger


def test_keda_objects_use_known_fields(docs: list[Doc]) -> None:
    """The KEDA resources are not schema-validated (custom kinds): check their fields here,
    so a typo shows before the API server rejects it or the CRD's pruning drops it."""
    for doc in (d for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS):
        spec = doc["spec"]
        if doc["kind"] == "TriggerAuthentication":
            assert set(spec) <= TRIGGER_AUTH_SPEC, f"{ident(doc)}: {set(spec) - TRIGGER_AUTH_SPEC}"
            continue
        assert set(spec) <= SCALED_OBJECT_SPEC, f"{ident(doc)}: {set(spec) - SCALED_OBJECT_SPEC}"
        assert set(spec["scaleTargetRef"]) <= {"name", "kind", "apiVersion"}, ident(doc)
        trigger = redis_trigger(doc)
        assert set(trigger) <= TRIGGER, f"{ident(doc)}: {set(trigger) - TRIGGER}"
        metadata = trigger["metadata"]
        assert set(metadata) <= REDIS_SCALER, f"{ident(doc)}: {set(metadata) - REDIS_SCALER}"
        assert {"listName", "listLength"} <= set(metadata), f"{ident(doc)}: list or target"
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        assert not bad, f"{ident(doc)}: trigger metadata must be strings (quote them): {bad}"
        assert int(metadata["listLength"]) >= 1, ident(doc)
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        assert 0 <= low <= high, f"{ident(doc)}: replicas {low}..{high}"
        assert high >= 1, f"{ident(doc)}: maxReplicaCount {high}"


def test_every_celery_worker_is_scaled_by_one_scaled_object(docs: list[Doc]) -> None:
    scaled_by: dict[str, list[str]] = {}
    for scaled in scaled_objects(docs):
        target, _, queue = scale_target(docs, scaled)
        scaled_by.setdefault(target["metadata"]["name"], []).append(ident(scaled))
        assert scaled["spec"].get("minReplicaCount", 0) == WORKER_MIN_REPLICAS[queue], (
            f"{ident(scaled)}: minReplicaCount"
        )
    for doc in (d for d in docs if d["kind"] == "Deployment"):
        queues = [q for c in containers(doc["spec"]["template"]) if (q := worker_queue(c))]
        if not queues:
            continue
        name = doc["metadata"]["name"]
        assert len(scaled_by.get(name, [])) == 1, f"{name}: scaled by {scaled_by.get(name)}"
        # A replica count in the manifest would reset KEDA's on every `kubectl apply`.
        assert "replicas" not in doc["spec"], f"{name}: KEDA owns the replicas, drop `replicas`"
    scaled_queues = {scale_target(docs, s)[2] for s in scaled_objects(docs)}
    assert set(WORKER_MIN_REPLICAS) <= scaled_queues, f"unscaled: {scaled_queues}"


def test_the_gpu_cluster_scales_further_than_dev() -> None:
    most = {
        overlay: {
            s["metadata"]["name"]: s["spec"]["maxReplicaCount"]
            for s in scaled_objects(_RENDERED.get(overlay) or render(overlay))
        }
        for overlay in OVERLAYS
    }
    for name, dev in most["dev"].items():
        assert most["gpu-cluster"][name] > dev, f"{name}: gpu-cluster max not above dev's"


def queue_list_key(celery: Any, queue: str, redis_url: str) -> str:
    """The Redis list that `celery` (a configured app) pushes the tasks of `queue` to: a real
    publish of a task routed there, through kombu's Redis transport, to the test's real Redis
    (the message is taken back). This is the list KEDA must watch."""
    import redis

    tasks = [name for name, route in celery.conf.task_routes.items() if route["queue"] == queue]
    assert tasks, f"no task is routed to the {queue} queue"
    celery.conf.broker_url = redis_url  # the app's own settings, on a server that exists
    client = redis.Redis.from_url(redis_url)

    def lengths() -> dict[bytes, int]:
        keys = client.scan_iter(match=f"*{queue}", _type="list")
        return {key: int(client.llen(key)) for key in keys}

    before = lengths()
    celery.send_task(tasks[0], args=["{}"])
    grown = [key for key, n in lengths().items() if n > before.get(key, 0)]
    assert len(grown) == 1, f"expected one list to grow, saw {grown}"
    client.lpop(grown[0])
    client.close()
    return grown[0].decode()


def test_queue_list_key_follows_the_bus_prefix(redis_url: str) -> None:
    from sentinel.workers.app import ROLLOUT_QUEUE, make_app

    settings = Settings.model_validate({"bus": {"prefix": "elsewhere"}})
    celery = make_app(settings, redis_url)
    assert queue_list_key(celery, ROLLOUT_QUEUE, redis_url) == f"elsewhere:celery:{ROLLOUT_QUEUE}"


def worker_app(
    docs: list[Doc], deployment: Doc, container: Doc, tmp_path: Path, env: pytest.MonkeyPatch
) -> tuple[Any, str]:
    """Run the container's `sentinel worker ...` line with the real CLI, its settings file and
    SENTINEL_* variables, up to Celery's worker_main: (the Celery app, the queue it consumes)."""
    from celery import Celery
    from typer.testing import CliRunner

    config = tmp_path / f"{deployment['metadata']['name']}.yaml"
    config.write_text(yaml.safe_dump(settings_yaml(docs)))
    for key in [k for k in os.environ if k.startswith("SENTINEL_")]:
        env.delenv(key)
    for var in container.get("env", []):
        if var["name"].startswith("SENTINEL_") and var["name"] not in NOT_SETTINGS:
            env.setenv(var["name"], re.sub(r"\$\((\w+)\)", "x", var.get("value", "")))
    for name in secret_vars(container):  # the keys the pod gets from the Secret
        env.setenv(name, f"secret-{name.lower()}")
    env.setenv("SENTINEL_CONFIG", str(config))
    with mock.patch.object(Celery, "worker_main", autospec=True) as worker_main:
        result = CliRunner().invoke(app, [str(a) for a in container["args"]])
    assert result.exit_code == 0, f"sentinel {container['args']}: {result.output}"
    celery, argv = worker_main.call_args.args
    return celery, argv[argv.index("--queues") + 1]


def test_scaled_objects_watch_the_celery_queue_lists(
    docs: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """listName is the list the worker's own Celery app uses: `<bus.prefix>:celery:<queue>`
    (global_keyprefix), with bus.prefix from the ConfigMap's settings (default `sentinel`);
    address and databaseIndex are the Redis the workers use, reachable from KEDA's namespace."""
    for scaled in scaled_objects(docs):
        deployment, container, queue = scale_target(docs, scaled)
        with monkeypatch.context() as env:
            celery, consumed = worker_app(docs, deployment, container, tmp_path, env)
        assert consumed == queue, f"`sentinel worker {queue}` consumes {consumed}"
        metadata = redis_trigger(scaled)["metadata"]
        broker = urlsplit(celery.conf.broker_url)  # before the publish points it at the test's
        key = queue_list_key(celery, consumed, redis_url)
        assert metadata["listName"] == key, f"{ident(scaled)}: watches {metadata['listName']}"
        prefix = Settings.model_validate(settings_yaml(docs)).bus.prefix
        assert key == f"{prefix}:celery:{queue}"
        assert metadata.get("databaseIndex", "0") == (broker.path.strip("/") or "0")
        host, _, port = metadata["address"].rpartition(":")
        service = get(docs, "Service", str(broker.hostname))
        namespace = service["metadata"]["namespace"]
        assert host in {f"{broker.hostname}.{namespace}.svc", f"{broker.hostname}.{namespace}"} | {
            f"{broker.hostname}.{namespace}.svc.cluster.local"
        }, f"{ident(scaled)}: {host} is not {broker.hostname} in namespace {namespace}"
        assert int(port) == broker.port
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_keda_authenticates_as_its_own_redis_user(docs: list[Doc]) -> None:
    """KEDA logs in as the ACL user `keda`, with the password Redis hashes for that user."""
    password = {"name": "sentinel-secrets", "key": acl_password_keys(docs)["keda"]}
    for scaled in scaled_objects(docs):
        assert redis_trigger(scaled)["metadata"].get("username") == "keda", ident(scaled)
        trigger = redis_trigger(scaled)
        ref = trigger.get("authenticationRef")
        assert ref is not None, f"{ident(scaled)}: no authenticationRef"
        assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
        auth = get(docs, "TriggerAuthentication", ref["name"])
        secrets = {s["parameter"]: s for s in auth["spec"].get("secretTargetRef", [])}
        assert "password" in secrets, f"{ident(auth)} gives no password"
        given = secrets["password"]
        assert (given["name"], given["key"]) == (password["name"], password["key"]), (
            f"{ident(auth)}: password from {given['name']}/{given['key']}, Redis uses "
            f"{password['name']}/{password['key']}"
        )
        secret = get(docs, "Secret", given["name"])
        assert given["key"] in {*secret.get("stringData", {}), *secret.get("data", {})}
        assert "passwordFromEnv" not in trigger["metadata"], "the password comes from the Secret"


def test_scaling_down_never_cuts_a_task_short(docs: list[Doc]) -> None:
    """Celery's warm shutdown (SIGTERM) lets running tasks finish: the grace period must
    outlast the hard time limit. Going to 0 waits cooldownPeriod after the list emptied: the
    last task taken must have ended by then."""
    limit = Settings.model_validate(settings_yaml(docs)).workers.time_limit_s
    for scaled in scaled_objects(docs):
        deployment, _, _ = scale_target(docs, scaled)
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > limit, f"{ident(deployment)}: grace {grace}s <= time limit {limit}s"
        if scaled["spec"].get("minReplicaCount", 0) == 0:
            cooldown = scaled["spec"].get("cooldownPeriod", 300)
            assert cooldown > limit, f"{ident(scaled)}: cooldown {cooldown}s <= {limit}s"


def test_only_the_keda_operator_reaches_redis_from_outside(docs: list[Doc]) -> None:
    """KEDA reads the lists from its own namespace; the evaluator above ignores rules with a
    namespaceSelector, so they are checked here: the operator, on 6379, and nothing else."""
    outside = [
        (ident(p), rule, peer)
        for p in docs
        if p["kind"] == "NetworkPolicy"
        for rule in p["spec"].get("ingress", [])
        for peer in rule.get("from", [])
        if "namespaceSelector" in peer or "ipBlock" in peer
    ]
    assert outside, "no policy lets the KEDA operator read the queue lengths"
    redis = pod_labels(docs)["sentinel-redis"]
    for name, rule, peer in outside:
        policy = get(docs, "NetworkPolicy", name.split("/")[1])
        assert selects(policy["spec"]["podSelector"], redis), f"{name}: not Redis's"
        assert peer.get("namespaceSelector") == {
            "matchLabels": {"kubernetes.io/metadata.name": "keda"}
        }, f"{name}: from more than the keda namespace"
        assert peer.get("podSelector") == {
            "matchLabels": {"app.kubernetes.io/name": "keda-operator"}
        }, f"{name}: from more than the KEDA operator"
        assert [p["port"] for p in rule.get("ports", [])] == [6379], f"{name}: ports"


# ---------------------------------------------------------------------------------------------
# secrets: nothing on a command line, one Redis ACL user per component, vLLM's key


def secret_vars(container: Doc) -> set[str]:
    """The container's variables whose value comes from a Secret."""
    return {v["name"] for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}


def acl_users(docs: list[Doc]) -> dict[str, str]:
    """Redis ACL user -> its rules, from the sentinel-redis-acl ConfigMap."""
    text = get(docs, "ConfigMap", "sentinel-redis-acl")["data"]["users"]
    lines = [line.split(None, 1) for line in text.splitlines()]
    return {parts[0]: parts[1] for parts in lines if parts and not parts[0].startswith("#")}


def acl_password_keys(docs: list[Doc]) -> dict[str, str]:
    """Redis ACL user -> the Secret key of its password (the Redis pod's password files)."""
    pod = get(docs, "StatefulSet", "sentinel-redis")["spec"]["template"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "acl-passwords")
    assert volume["secret"]["secretName"] == "sentinel-secrets"
    return {item["path"]: item["key"] for item in volume["secret"]["items"]}


def test_no_secret_is_on_any_command_line(docs: list[Doc]) -> None:
    """`ps` and the pod spec show command lines: no password or key flag there, and no
    $(VAR) expansion of a variable taken from a Secret."""
    bad = []
    for name, _, container in all_containers(docs):
        line = [str(a) for a in [*container.get("command", []), *container.get("args", [])]]
        hidden = secret_vars(container)
        for arg in line:
            if re.match(r"--?(requirepass|api-key|password|pass|token)\b", arg):
                bad.append(f"{name}: {arg}")
            bad += [f"{name}: $({v})" for v in re.findall(r"\$\((\w+)\)", arg) if v in hidden]
            if PLACEHOLDER in arg:
                bad.append(f"{name}: a Secret value in {arg!r}")
    assert not bad, f"secrets on command lines: {bad}"


def test_each_component_is_its_own_redis_user(docs: list[Doc]) -> None:
    """Every pod that reaches Redis logs in as its component's ACL user, with that user's
    password from the Secret; no two workloads share a user, and the default user is off."""
    users, keys = acl_users(docs), acl_password_keys(docs)
    assert set(users) == set(keys), "ACL users and their password files differ"
    seen: dict[str, str] = {}
    for name, _, container in all_containers(docs):
        url = env_value(container, "SENTINEL_REDIS_URL")
        if url is None:
            continue
        parts = urlsplit(url)
        user = parts.username or ""
        assert user in users, f"{name}: Redis user {user!r} has no ACL entry"
        assert user not in {"admin", "default", "keda", "health"}, f"{name}: logs in as {user}"
        variable = re.fullmatch(r"\$\((\w+)\)", parts.password or "")
        assert variable, f"{name}: the password is not from a variable"
        source = next(v for v in container["env"] if v["name"] == variable.group(1))
        assert source["valueFrom"]["secretKeyRef"]["key"] == keys[user], name
        workload = name.rsplit("/", 1)[0]
        assert seen.setdefault(user, workload) == workload, f"{workload} and {seen[user]}: {user}"
    assert set(seen) >= {"orchestrator", "worker-rollout", "worker-validate", "monitor"}
    secret = get(docs, "Secret", "sentinel-secrets")
    assert set(keys.values()) <= set(secret["stringData"]), "password keys missing from Secret"


def test_vllm_takes_its_key_from_the_secret_and_clients_need_it() -> None:
    docs = _RENDERED.get("gpu-cluster") or render("gpu-cluster")
    _, vllm = container_of(docs, "Deployment", "sentinel-vllm", "vllm")
    source = next(v for v in vllm["env"] if v["name"] == "VLLM_API_KEY")
    ref = source["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True, "vLLM would start without a key"
    settings = Settings.model_validate(settings_yaml(docs))
    assert settings.llm.policy.key_required, "the policy endpoint would run without its key"
    for name, _, container in all_containers(docs):
        for var in container.get("env", []):
            if var["name"] == settings.llm.policy.api_key_env:
                given = var["valueFrom"]["secretKeyRef"]
                assert (given["name"], given["key"]) == (ref["name"], ref["key"]), name
                assert given.get("optional") is not True, f"{name}: starts without the key"


def render_acl(docs: list[Doc], tmp_path: Path, passwords: dict[str, str]) -> subprocess.Popen[str]:
    """Run the Redis pod's render-acl.sh with `passwords` as its password files."""
    acl = get(docs, "ConfigMap", "sentinel-redis-acl")["data"]
    (tmp_path / "users").write_text(acl["users"])
    (tmp_path / "render-acl.sh").write_text(acl["render-acl.sh"])
    (tmp_path / "passwords").mkdir(exist_ok=True)
    for user, password in passwords.items():
        (tmp_path / "passwords" / user).write_text(password)
    env = {
        "PATH": os.environ["PATH"],
        "ACL_RULES": str(tmp_path / "users"),
        "ACL_PASSWORDS": str(tmp_path / "passwords"),
        "ACL_FILE": str(tmp_path / "users.acl"),
    }
    return subprocess.Popen(
        ["sh", str(tmp_path / "render-acl.sh")], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_the_acl_script_refuses_placeholders_and_missing_passwords(tmp_path: Path) -> None:
    docs = _RENDERED.get("dev") or render("dev")
    users = acl_users(docs)
    placeholder = {u: f"{PLACEHOLDER}-{u}" for u in users}
    _, err = (proc := render_acl(docs, tmp_path, placeholder)).communicate(timeout=30)
    assert proc.returncode != 0, err
    assert "placeholder" in err, err
    (tmp_path / "passwords" / "keda").unlink()
    real = {u: f"pw-{u}" for u in users if u != "keda"}
    _, err = (proc := render_acl(docs, tmp_path, real)).communicate(timeout=30)
    assert proc.returncode != 0, err
    assert "no password for Redis user keda" in err, err
    assert not (tmp_path / "users.acl").exists()


KEDA_LENGTH = (  # what KEDA's redis scaler runs for a list's length
    "local t = redis.call('type', KEYS[1]).ok if t == 'list' then "
    "return redis.call('llen', KEYS[1]) else return 0 end"
)


def test_the_acl_grants_each_user_what_it_needs_and_no_more(tmp_path: Path) -> None:
    """The rendered ACL file on a real redis-server: a component runs the bus (publish, group
    reads, acks, scripts) and Celery's producer under the prefix; nothing dangerous, nothing
    outside the prefix; KEDA reads a queue's length only; the probe only PINGs; the default
    user is off."""
    import redis as sync_redis
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    from sentinel.orchestrator.redis_server import find_redis_server
    from sentinel.process import free_port

    docs = _RENDERED.get("gpu-cluster") or render("gpu-cluster")
    passwords = {u: f"pw-{u}-{os.getpid()}" for u in acl_users(docs)}
    _, err = (proc := render_acl(docs, tmp_path, passwords)).communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0, "the ACL file is readable"
    assert not any(p in (tmp_path / "users.acl").read_text() for p in passwords.values())
    port = free_port()
    server = subprocess.Popen(
        [str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--aclfile", str(tmp_path / "users.acl"), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def client(user: str | None) -> sync_redis.Redis:
        auth = f"{user}:{passwords[user]}@" if user else ""
        return sync_redis.Redis.from_url(f"redis://{auth}127.0.0.1:{port}/0")

    try:
        for _ in range(100):
            try:
                client("health").ping()
                break
            except sync_redis.ConnectionError:
                import time

                time.sleep(0.05)
        with pytest.raises((AuthenticationError, ResponseError)):
            client(None).ping()  # the default user is off
        worker = client("worker-rollout")
        worker.xadd("sentinel:trajectories", {"x": "1"})
        worker.xgroup_create("sentinel:trajectories", "g", id="0")
        assert worker.xreadgroup("g", "c", {"sentinel:trajectories": ">"}, count=1)
        assert worker.eval("return redis.call('hset', KEYS[1], 'a', 1)", 1, "sentinel:h") == 1
        worker.lpush("sentinel:celery:rollout", "task")
        for denied in (
            lambda: worker.set("elsewhere", 1), lambda: worker.keys("*"),
            lambda: worker.flushall(), lambda: worker.config_get("*"),
            lambda: worker.execute_command("ACL", "LIST"), lambda: worker.debug_object("x"),
            lambda: worker.eval("return redis.call('get', KEYS[1])", 1, "elsewhere"),
        ):  # fmt: skip
            with pytest.raises((NoPermissionError, ResponseError), match=r"(?i)perm"):
                denied()
        keda = client("keda")
        assert keda.eval(KEDA_LENGTH, 1, "sentinel:celery:rollout") == 1
        with pytest.raises(NoPermissionError):
            keda.lpop("sentinel:celery:rollout")
        with pytest.raises((NoPermissionError, ResponseError)):
            keda.eval(KEDA_LENGTH, 1, "sentinel:trajectories")
        with pytest.raises(NoPermissionError):
            client("health").get("sentinel:h")
        monitor = client("monitor")
        assert monitor.xinfo_groups("sentinel:trajectories")[0]["name"] == b"g"
        assert monitor.xtrim("sentinel:trajectories", maxlen=10) == 0
        with pytest.raises(NoPermissionError):
            monitor.set("sentinel:x", 1)
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------------------------------------
# checkov (optional)


# `make test` installs checkov into its own venv here (its pins clash with ours).
CHECKOV_TOOL = ROOT / ".cache" / "tools" / "checkov" / "bin" / "checkov"


def checkov_command() -> list[str] | None:
    if importlib.util.find_spec("checkov") is not None:
        return [sys.executable, "-m", "checkov.main"]
    if CHECKOV_TOOL.is_file():
        return [str(CHECKOV_TOOL)]
    found = shutil.which("checkov")  # e.g. `pipx install checkov`
    return [found] if found else None


def test_checkov_passes_on_the_rendered_overlay(
    overlay: str, docs: list[Doc], tmp_path: Path
) -> None:
    """checkov's Kubernetes checks on what `kubectl apply -k` would apply; the checks it
    skips are listed and justified in deploy/.checkov.yaml."""
    command = checkov_command()
    if command is None and os.environ.get("SENTINEL_REQUIRE_CHECKOV"):
        pytest.fail("checkov is required here (SENTINEL_REQUIRE_CHECKOV) and is not installed")
    if command is None:
        pytest.skip("checkov is not installed (`make checkov`, or pipx install checkov)")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = subprocess.run(
        [
            *command,
            "--config-file", str(DEPLOY / ".checkov.yaml"),
            "--file", str(rendered),
            "--output", "json", "--quiet", "--compact",
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    assert [r.get("check_type") for r in reports] == ["kubernetes"], result.stdout[:500]
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["resource_count"] > 0, summary
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in reports[0]["results"]["failed_checks"]
    ]
    assert not failed, "checkov:\n" + "\n".join(failed)


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last:]


def test_both_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"app.Dockerfile", "trainer.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_multistage_non_root_and_runs_sentinel(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    stages: set[str] = set()
    froms = [rest for keyword, rest in steps if keyword == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    for rest in froms:
        words = [w for w in rest.split() if not w.startswith("--platform")]
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image in stages:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or re.search(r"\d", tag), f"FROM {image} is not pinned"
        assert tag != "latest", f"FROM {image} is not pinned"
        assert "$" not in image, f"FROM {image}: pin it literally, not through an ARG"
    last = final_stage(steps)
    users = [rest for keyword, rest in last if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"USER {user} is root"
    assert user == "10001", f"USER {user}: the manifests run as UID 10001"
    entrypoints = [rest for keyword, rest in last if keyword == "ENTRYPOINT"]
    assert entrypoints, "the final stage has no ENTRYPOINT"
    assert yaml.safe_load(entrypoints[-1]) == ["sentinel"], entrypoints[-1]
    copies = [rest for keyword, rest in last if keyword == "COPY"]
    assert copies, "the final stage copies nothing from the builder"
    assert all("--from=" in c for c in copies), "the final stage copies from the build context"
    runs = " ".join(rest for keyword, rest in last if keyword == "RUN")
    for tool in ("build-essential", "gcc", "pip install", "apt-get install"):
        assert tool not in runs, f"the final stage installs {tool}"
    cmds = [rest for keyword, rest in last if keyword == "CMD"]
    if cmds:
        check_sentinel_line([str(a) for a in yaml.safe_load(cmds[-1])])


def test_dockerfile_check_rejects_unpinned_and_root(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    cases = {
        "latest": 'FROM python:latest AS b\nFROM b\nUSER 10001\nENTRYPOINT ["sentinel"]\n',
        "root": "FROM python:3.11.11 AS b\nFROM python:3.11.11\nCOPY --from=b /a /a\n"
        'USER root\nENTRYPOINT ["sentinel"]\n',
        "entrypoint": "FROM python:3.11.11 AS b\nFROM python:3.11.11\nCOPY --from=b /a /a\n"
        'USER 10001\nENTRYPOINT ["python"]\n',
    }
    for text in cases.values():
        bad.write_text(text)
        with pytest.raises(AssertionError):
            test_dockerfile_is_pinned_multistage_non_root_and_runs_sentinel(bad)


def test_instructions_join_continuations(tmp_path: Path) -> None:
    path = tmp_path / "x.Dockerfile"
    path.write_text('# c\nRUN a \\\n    && b\nCMD ["x"]\n')
    assert instructions(path) == [("RUN", "a      && b"), ("CMD", '["x"]')]
