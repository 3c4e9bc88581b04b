"""The scale-out configuration (platform/, docker/, .dockerignore), checked without a Docker engine or a
Kubernetes cluster: schemas, the install path, paths that must exist, loopback-only ports, token authentication
and the absence of secrets."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
DOCKER = ROOT / "docker"
CLUSTER_YAML = PLATFORM / "ray" / "cluster.yaml"
RAYCLUSTER_YAML = PLATFORM / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = PLATFORM / "kuberay" / "rayjob.yaml"
START_SERVER = PLATFORM / "mlflow" / "start-server.sh"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
# The schemas travel with the repository; the shared folder next to the checkout is where they came from.
VENDORED_SCHEMAS = PLATFORM / "kuberay" / "schemas"
SHARED_SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"

CONFIG_FILES = sorted(p for d in (PLATFORM, DOCKER) for p in d.rglob("*") if p.is_file()) + [ROOT / ".dockerignore"]
YAML_FILES = [p for p in CONFIG_FILES if p.suffix in (".yaml", ".yml")]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- every file parses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_file_parses_to_a_mapping(path):
    assert isinstance(load_yaml(path), dict)


def test_platform_is_never_a_python_package():
    assert not list(PLATFORM.rglob("__init__.py"))
    # A package named platform would shadow the standard library module that Ray and torch import.
    found = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__)"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert not Path(found).resolve().is_relative_to(ROOT), found


# --- ray up ------------------------------------------------------------------------------------------------

def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_config_validates_against_the_installed_ray_schema():
    jsonschema.validate(load_yaml(CLUSTER_YAML), ray_schema())


def test_ray_schema_rejects_a_misspelt_cluster_key():
    config = load_yaml(CLUSTER_YAML)
    config["docker"]["run_option"] = config["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_ray_cluster_config_passes_rays_own_checks_after_defaults():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_yaml(CLUSTER_YAML))  # what `ray up` does first, offline
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["setup_commands"] == []  # not Ray's defaults, which install Ray on the nodes


def test_ray_cluster_keeps_the_dashboard_on_loopback():
    config = load_yaml(CLUSTER_YAML)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    every = " ".join(c for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                                   "head_setup_commands", "worker_setup_commands") for c in config.get(key, []))
    assert set(re.findall(r"--dashboard-host[= ](\S+)", every)) == {"127.0.0.1"}
    assert not any("8265" in opt for opt in config["docker"]["run_options"])  # no published dashboard port


def test_ray_cluster_runs_with_token_auth_from_a_mounted_token_file():
    config = load_yaml(CLUSTER_YAML)
    options = config["docker"]["run_options"]
    assert "--env=RAY_AUTH_MODE=token" in options
    paths = [o.split("=", 2)[2] for o in options if o.startswith("--env=RAY_AUTH_TOKEN_PATH=")]
    assert len(paths) == 1
    # The token reaches the nodes only as a file: the path lies in a mounted directory, and no value is written.
    assert any(paths[0].startswith(target.rstrip("/") + "/") for target in config["file_mounts"])
    assert not any(o.startswith("--env=RAY_AUTH_TOKEN=") for o in options)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert 'test -s "$RAY_AUTH_TOKEN_PATH"' in config[key][-1], f"{key} must refuse to start without a token"


def test_ray_cluster_runs_the_project_image_with_a_sized_shm():
    docker = load_yaml(CLUSTER_YAML)["docker"]
    assert re.fullmatch(r"\S*asda-platform:cuda", docker["image"]) and docker["container_name"]
    for role in ("head", "worker"):
        options = docker["run_options"] + docker.get(f"{role}_run_options", [])
        sizes = [o for o in options if o.startswith("--shm-size=")]
        assert len(sizes) == 1 and re.fullmatch(r"--shm-size=\d+g", sizes[0]), (role, sizes)


def test_ray_cluster_installs_nothing_of_the_project_on_the_nodes():
    config = load_yaml(CLUSTER_YAML)
    assert config["setup_commands"] == [] and config["worker_setup_commands"] == []
    assert not any("asda" in c or "make setup" in c for c in config["head_setup_commands"])


def test_ray_cluster_gpu_workers_each_fit_a_paper_trial():
    from sweeps.grid import load_grid

    config = load_yaml(CLUSTER_YAML)
    workers = int(load_grid("paper").train["workers"])
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["resources"]["GPU"] >= workers for t in gpu_types)
    assert all(t["max_workers"] >= t.get("min_workers", 0) for t in gpu_types)


# --- KubeRay -----------------------------------------------------------------------------------------------

def crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of a KubeRay CRD, from the repository's copy, else the shared folder."""
    for folder in (VENDORED_SCHEMAS, SHARED_SCHEMAS):
        path = folder / f"{kind}.v1.schema.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            if doc.get("kind") == "CustomResourceDefinition":  # a whole CRD: take its v1 schema
                version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
                doc = version["schema"]["openAPIV3Schema"]
            return doc
    pytest.skip(f"no {kind}.v1.schema.json in {VENDORED_SCHEMAS} or {SHARED_SCHEMAS}")


def strict(schema):
    """Reject fields the schema does not know, as the API server's strict field validation (kubectl's default)
    does; a plain JSON Schema reading would let a misspelt field through silently."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_errors(doc: dict, kind: str) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(crd_schema(kind)))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def cluster_spec(path: Path) -> dict:
    doc = load_yaml(path)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def ray_pod_specs(path: Path) -> list[dict]:
    spec = cluster_spec(path)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path, kind", [(RAYCLUSTER_YAML, "RayCluster"), (RAYJOB_YAML, "RayJob")],
                         ids=["raycluster", "rayjob"])
def test_kuberay_manifest_validates_against_its_crd_schema(path, kind):
    doc = load_yaml(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    assert crd_errors(doc, kind) == []


def test_strict_crd_validation_rejects_a_misspelt_field_and_a_wrong_type():
    doc = load_yaml(RAYCLUSTER_YAML)
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"]["sizelimit"] = "1Gi"
    assert any("sizelimit" in e for e in crd_errors(bad, "RayCluster"))
    bad = copy.deepcopy(doc)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # Ray start params are strings
    assert crd_errors(bad, "RayCluster")


def test_vendored_kuberay_schemas_match_the_shared_source():
    if not SHARED_SCHEMAS.is_dir():
        pytest.skip(f"{SHARED_SCHEMAS} is not there to compare with")
    for kind in ("RayCluster", "RayJob"):
        vendored = VENDORED_SCHEMAS / f"{kind}.v1.schema.json"
        assert json.loads(vendored.read_text()) == json.loads((SHARED_SCHEMAS / vendored.name).read_text())


def test_rayjob_brings_up_the_same_cluster_as_raycluster():
    assert cluster_spec(RAYJOB_YAML) == cluster_spec(RAYCLUSTER_YAML)


def ray_containers(path: Path) -> list[dict]:
    containers = [c for pod in ray_pod_specs(path) for c in pod["containers"]]
    submitter = load_yaml(path)["spec"].get("submitterPodTemplate")
    return containers + (submitter["spec"]["containers"] if submitter else [])


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML], ids=rel)
def test_every_ray_container_has_token_auth_from_a_secret(path):
    secrets = set()
    for container in ray_containers(path):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token", container["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{container['name']}: a token value is written in the manifest"
        ref = token["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1  # one Secret for the whole cluster
    assert not any(d and d.get("kind") == "Secret" for d in yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML], ids=rel)
def test_ray_pods_have_a_memory_backed_shm_and_the_workers_gpus(path):
    for pod in ray_pod_specs(path):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"], container["name"]
            assert "asda-platform" in container["image"]
    groups = cluster_spec(path)["workerGroupSpecs"]
    assert any(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
               for g in groups)
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)


def test_kuberay_head_service_is_never_public():
    for path in (RAYCLUSTER_YAML, RAYJOB_YAML):
        head = cluster_spec(path)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress")
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    values = json.dumps([load_yaml(RAYCLUSTER_YAML), load_yaml(RAYJOB_YAML)])  # comments aside
    assert "LoadBalancer" not in values and "NodePort" not in values and "Ingress" not in values


def test_rayjob_entrypoint_is_a_paper_sweep_that_the_cli_accepts():
    from pipelines.cli import build_parser
    from sweeps.grid import load_grid

    argv = shlex.split(load_yaml(RAYJOB_YAML)["spec"]["entrypoint"])
    assert argv[:2] == ["asda", "sweep"]
    args = build_parser().parse_args(argv[1:])
    assert args.grid == "paper"
    grid = load_grid(args.grid)
    # The data the grid names, and the sweep's storage, are on a volume every Ray pod mounts.
    for pod in ray_pod_specs(RAYJOB_YAML):
        for container in pod["containers"]:
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            for needed in (grid.data["prepared"], grid.evaluation["data"], str(args.storage)):
                assert any(Path(needed).is_relative_to(m) for m in mounts), (container["name"], needed)
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert re.fullmatch(r"https?://\S+", env["MLFLOW_TRACKING_URI"] or "")


# --- Dockerfile and the build context -------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def makefile_recipes(target: str) -> list[str]:
    """The recipe lines that `make <target>` runs, following prerequisites that are rules, variables expanded."""
    variables, rules, current = {}, {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current is not None:
            for name in current:
                rules[name][1].append(line.strip())
            continue
        if m := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line):
            variables[m[1]] = m[2].strip()
            current = None
        elif m := re.match(r"^([^:#=\t][^:=]*):(?!=)\s*(.*)$", line):
            current = []
            for name in m[1].split():
                rules.setdefault(name, ([], []))[0].extend(m[2].split())
                current.append(name)
        else:
            current = None

    def expand(text: str) -> str:
        for _ in range(10):
            text = re.sub(r"\$\((\w+)\)", lambda v: variables.get(v[1], v[0]), text)
        return text

    rules = {expand(name): ([expand(p) for p in prereqs], recipe) for name, (prereqs, recipe) in rules.items()}
    seen, lines = set(), []

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        for prereq in rules[name][0]:
            visit(prereq)
        lines.extend(expand(line) for line in rules[name][1])

    visit(target)
    return lines


def test_makefile_setup_is_a_venv_with_the_editable_dev_install():
    recipe = makefile_recipes("setup")
    assert any(re.search(r"-m venv \.venv\b", line) for line in recipe), recipe
    assert any(re.fullmatch(r"\.venv/bin/pip install (--quiet )?-e '\.\[dev\]'", line) for line in recipe), recipe


def test_dockerfile_installs_the_project_only_through_make_setup():
    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN"]
    assert any(re.search(r"(^|&&\s*)make setup\b", run) for run in runs), runs
    # Nothing else installs the project: a pip install is only the optional extra packages.
    for run in runs:
        for pip in re.findall(r"pip install [^&;]*", run):
            assert "$EXTRA_PIP_PACKAGES" in pip and not re.search(r"\s(-e\s|\.\s|\.$|'\.\[)", pip), pip


def test_dockerfile_puts_the_venv_on_path_for_every_shell():
    instructions = dockerfile_instructions()
    env = " ".join(args for instr, args in instructions if instr == "ENV")
    assert re.search(r"PATH=/app/\.venv/bin:\$PATH", env)
    # `ray up` runs its commands in login shells, whose /etc/profile resets PATH.
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    assert re.search(r"export PATH=/app/\.venv/bin:\$PATH' > /etc/profile\.d/\S+\.sh", runs)


def test_dockerfile_builds_cpu_and_cuda_variants_from_one_file():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    assert args["VARIANT"] == "cpu"
    froms = [a for i, a in instructions if i == "FROM"]
    stages = {f.split(" AS ")[1].strip() for f in froms if " AS " in f}
    assert {"base-cpu", "base-cuda"} <= stages and froms[-1] == "base-${VARIANT}"
    assert args["CPU_BASE_IMAGE"].startswith("python:3.11")
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(runtime|base)-ubuntu\d+\.\d+", args["CUDA_BASE_IMAGE"])


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out (Docker's rules: a pattern also excludes what lies below)."""
    parts, excluded = path.strip("/").split("/"), False
    for pattern in dockerignore_patterns():
        negate, regex = pattern.startswith("!"), glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_paths_that_exist_and_the_context_keeps():
    for instr, args in dockerfile_instructions():
        if instr not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), source
            assert source == "." or not dockerignored(source), source


def test_build_context_keeps_the_source_and_leaves_out_local_state():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["Makefile", "pyproject.toml", project["project"]["readme"], "platform/mlflow/start-server.sh",
              "sweeps/grids/paper.yaml", *(f"{p}/__init__.py" for p in packages)]
    for path in needed:
        assert (ROOT / path).exists() and not dockerignored(path), path
    for path in (".venv/bin/python", ".git/HEAD", "data/prepared/x", "results/sweeps/x", "mlruns/mlflow.db",
                 "pipelines/__pycache__/cli.pyc", "docker/.env", "asda_platform.egg-info/PKG-INFO"):
        assert dockerignored(path), path


# --- docker compose --------------------------------------------------------------------------------------------

# Service keys of the Compose specification that a file like ours may use; a misspelt key is not among them.
COMPOSE_SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "command", "container_name", "depends_on", "deploy", "devices", "entrypoint",
    "env_file", "environment", "expose", "extra_hosts", "gpus", "healthcheck", "hostname", "image", "init", "ipc",
    "labels", "logging", "network_mode", "networks", "profiles", "pull_policy", "read_only", "restart", "secrets",
    "security_opt", "shm_size", "stop_grace_period", "tmpfs", "ulimits", "user", "volumes", "working_dir", "ports",
}


def compose_services(path: Path = COMPOSE) -> dict:
    return load_yaml(path)["services"]


def published(port) -> tuple[str | None, str]:
    """(host address or None, the published part) of a short or long port entry."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port.get("published", ""))
    parts = str(port).rsplit(":", 2)
    return (parts[0] if len(parts) == 3 else None), str(port)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=rel)
def test_compose_publishes_ports_on_loopback_only(path):
    for name, service in compose_services(path).items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host, entry = published(port)
            assert host == "127.0.0.1", f"{name}: {entry} is not bound to 127.0.0.1"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=rel)
def test_compose_services_use_only_compose_spec_keys(path):
    for name, service in compose_services(path).items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (name, set(service) - COMPOSE_SERVICE_KEYS)
    assert set(load_yaml(path)) <= {"name", "services", "volumes", "networks", "secrets", "configs"} | {
        k for k in load_yaml(path) if k.startswith("x-")}


def test_compose_files_build_contexts_and_scripts_exist():
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in compose_services(path).items():
            build = service.get("build")
            if isinstance(build, dict) and "context" in build:
                context = (path.parent / build["context"]).resolve()
                assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            for entry in service.get("env_file", []):
                assert (path.parent / entry).is_file(), (name, entry)
            for volume in service.get("volumes", []):
                source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
                if source.startswith((".", "/")):
                    assert (path.parent / source).exists(), (name, source)
            # Paths inside the image are the repository's paths under /app.
            command = json.dumps([service.get("command"), service.get("entrypoint")])
            for inside in re.findall(r"/app/([\w./-]+)", command):
                assert (ROOT / inside).exists(), (name, inside)
    assert set(compose_services(COMPOSE_GPU)) <= set(compose_services(COMPOSE))


def test_compose_runs_start_server_script_for_mlflow():
    mlflow = compose_services()["mlflow"]
    assert json.dumps(mlflow["command"]).count("platform/mlflow/start-server.sh") == 1
    assert {"boto3", "psycopg[binary]"} <= set(mlflow["build"]["args"]["EXTRA_PIP_PACKAGES"].split())
    assert os.access(START_SERVER, os.X_OK)


def test_compose_ray_services_use_token_auth_a_sized_shm_and_scale():
    services = compose_services()
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]*\}", env["RAY_AUTH_TOKEN"]), name
        assert service["shm_size"], name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker  # replicas would collide
    assert "ray-head:6379" in worker["command"]


def test_compose_secrets_are_required_variables_without_defaults():
    text = COMPOSE.read_text()
    references = re.findall(r"\$\{([A-Z0-9_]+)([:?+-]*)", text)
    secret_like = [(name, op) for name, op in references if re.search(r"PASSWORD|SECRET|TOKEN|ROOT_USER", name)]
    assert secret_like
    assert all(op == ":?" for _, op in secret_like), secret_like


# --- no secrets in files ---------------------------------------------------------------------------------------

SECRET_NAME = r"[A-Z][A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|ACCESS_KEY|ACCESS_KEY_ID|API_KEY|CREDENTIALS?)"
ASSIGNMENT = re.compile(rf"\b({SECRET_NAME})\b\s*[:=]\s*[\"']?([^\s\"'#,]*)")
URI_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@")
KNOWN_FORMATS = [
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\b[0-9a-f]{48,}\b"),  # e.g. openssl rand -hex 32
    re.compile(r"(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])\b[A-Za-z0-9+/]{40,}={0,2}"),
]


def is_placeholder(value: str) -> bool:
    return (value == "" or value.startswith(("$", "<")) or "change-me" in value
            or re.fullmatch(r"[A-Z_]+", value) is not None)


def secret_findings(text: str) -> list[str]:
    found = [f"{m[1]}={m[2]}" for m in ASSIGNMENT.finditer(text) if not is_placeholder(m[2])]
    found += [m[0] for m in URI_CREDENTIALS.finditer(text) if not is_placeholder(m[1])]
    found += [m[0] for pattern in KNOWN_FORMATS for m in pattern.finditer(text)]
    return found


def test_secret_scan_flags_literal_credentials_and_passes_references():
    for leak in ("POSTGRES_PASSWORD=hunter2", "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                 "postgresql://mlflow:s3cret@db:5432/mlflow", "key AKIAIOSFODNN7EXAMPLE",
                 "RAY_AUTH_TOKEN=" + "3f9a" * 16, "-----BEGIN OPENSSH PRIVATE KEY-----"):
        assert secret_findings(leak), leak
    for fine in ("POSTGRES_PASSWORD=change-me", "RAY_AUTH_TOKEN: ${RAY_AUTH_TOKEN:?set it}",
                 "RAY_AUTH_TOKEN_PATH=/run/asda/ray-auth/auth_token", "postgresql://${U}:${P}@db/x",
                 "postgresql://USER:PASSWORD@HOST:5432/DB", "commit feeaf72facab4881ba2b179248bb67315634e229"):
        assert not secret_findings(fine), fine


@pytest.mark.parametrize("path", CONFIG_FILES, ids=rel)
def test_no_secret_is_written_in_platform_or_docker_files(path):
    assert secret_findings(path.read_text()) == []


# --- the MLflow server script ---------------------------------------------------------------------------------

def run_start_server(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(START_SERVER)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_start_server_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(START_SERVER)], check=True)
    assert START_SERVER.read_text().splitlines()[:5].count("set -euo pipefail") == 1


def test_start_server_script_names_the_missing_variables_in_an_empty_environment():
    result = run_start_server({})
    assert result.returncode != 0
    for name in ("POSTGRES_PASSWORD", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert name in result.stderr


@pytest.fixture
def fake_server_env(tmp_path):
    """An environment in which `mlflow` records its arguments instead of serving, and the server's extra
    packages import (stand-ins), so the script runs to its exec."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    (site / "psycopg").mkdir(parents=True)
    (site / "psycopg" / "__init__.py").write_text("")
    (site / "boto3.py").write_text("")
    fake = bin_dir / "mlflow"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/args"\nprintf "%s" "$MLFLOW_BACKEND_STORE_URI" > "$OUT/uri"\n')
    fake.chmod(0o755)
    return {
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "PYTHONPATH": str(site), "OUT": str(tmp_path),
        "POSTGRES_HOST": "db", "POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "p@ss/word", "POSTGRES_DB": "mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key",
    }


def test_start_server_script_serves_proxied_s3_artifacts_on_loopback(fake_server_env, tmp_path):
    result = run_start_server(fake_server_env)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().split()
    assert args == ["server", "--host", "127.0.0.1", "--port", "5000", "--serve-artifacts",
                    "--artifacts-destination", "s3://bucket/mlflow"]
    # The backend store goes through the environment (not the process list), its password URI-encoded.
    assert (tmp_path / "uri").read_text() == "postgresql://mlflow:p%40ss%2Fword@db:5432/mlflow"


@pytest.mark.parametrize("change, named", [
    ({"AWS_SECRET_ACCESS_KEY": ""}, "AWS_SECRET_ACCESS_KEY"),
    ({"MLFLOW_ARTIFACTS_DESTINATION": "file:///tmp/artifacts"}, "MLFLOW_ARTIFACTS_DESTINATION"),
    ({"PYTHONPATH": ""}, "psycopg[binary]"),
])
def test_start_server_script_refuses_an_incomplete_setup(fake_server_env, tmp_path, change, named):
    env = {**fake_server_env, **change}
    if "PYTHONPATH" in change:  # the stand-ins gone: boto3 is not a project dependency
        if subprocess.run([sys.executable, "-c", "import boto3, psycopg"], capture_output=True).returncode == 0:
            pytest.skip("boto3 and psycopg are installed here, so nothing is missing")
    result = run_start_server(env)
    assert result.returncode != 0 and named in result.stderr
    assert not (tmp_path / "args").exists()
