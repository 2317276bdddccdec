"""infra/ as shipped: each config is loaded the way its tool loads it and checked for what a cluster needs.

The container runs as a non-root user that owns its workspace; every KubeRay pod gets a
memory-backed /dev/shm and the shared volume at the same path; the dashboard and the client port
are never open on all interfaces without the Ray token; and every `ray`, `train-food` and `prefect`
command in infra/README.md parses with the pinned CLIs. Nothing here starts Ray, Docker or a cluster.
"""

from __future__ import annotations

import itertools
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SHARED = "/mnt/train-food"  # where every node mounts the shared volume
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A Prefect process worker passes its own values of these to each flow run.
WORKER_ENV = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"}

# Ray's CLI module imports Ray Serve, whose config models use a form pydantic deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = (re.fullmatch(r"([\w-]+)(?:\[[\w,]+\])?==(\S+)", dep) for dep in project["dependencies"])
    exact = dict(match.groups() for match in pinned if match)
    python = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"]).groups()
    return {"ray": exact["ray"], "prefect": exact["prefect"], "version": project["version"],
            "python": "".join(python)}


PINS = _pins()
IMAGE = f"train-food:{PINS['version']}"  # the tag infra/README.md builds


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def _image_user() -> tuple[int, int]:
    users = [args for op, args in _dockerfile() if op == "USER"]
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid)  # numeric ids: Kubernetes can only verify runAsNonRoot against those


def _raycluster() -> tuple[dict, list[dict]]:
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text()))
    (cluster,) = [doc for doc in docs if doc["kind"] == "RayCluster"]
    return cluster, docs


def _pod_templates(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]["spec"]}
    templates |= {group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]}
    return templates


def _mounts(pod: dict) -> dict[str, dict]:
    """Mount path -> volume of the Ray container (KubeRay treats containers[0] as the Ray container)."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    return {mount["mountPath"]: volumes[mount["name"]] | {"readOnly": mount.get("readOnly", False)}
            for mount in pod["containers"][0].get("volumeMounts", [])}


def _cluster_launcher() -> dict:
    return yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())


def _parse_ray(args: list[str]) -> dict:
    """Parse `ray ARGS` with the pinned Ray CLI without running it; the parsed options."""
    from ray.scripts.scripts import cli

    command = cli.commands.get(args[0])
    assert command is not None, f"`ray {args[0]}` is not a command of ray {PINS['ray']}"
    try:
        return command.make_context(args[0], args[1:]).params
    except click.UsageError as err:
        pytest.fail(f"`ray {shlex.join(args)}`: {err}")


def test_images_are_the_pinned_ray_and_the_built_tag():
    ops = _dockerfile()
    args = dict(arg.split("=", 1) for op, arg in ops if op == "ARG" and "=" in arg)
    base = next(arg for op, arg in ops if op == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base == f"rayproject/ray:{PINS['ray']}-py{PINS['python']}"
    cluster, _ = _raycluster()
    assert cluster["spec"]["rayVersion"] == PINS["ray"]
    images = [container["image"] for pod in _pod_templates(cluster).values() for container in pod["containers"]]
    images.append(_cluster_launcher()["docker"]["image"])
    assert set(images) == {IMAGE}
    assert f"-t {IMAGE} ." in (INFRA / "README.md").read_text()


def test_container_runs_as_a_non_root_user_that_owns_its_workspace():
    from flows.pipeline_config import PipelineConfig

    ops = _dockerfile()
    uid, gid = _image_user()
    assert uid != 0 and gid != 0
    user_at = [i for i, (op, _) in enumerate(ops) if op == "USER"]
    assert len(user_at) == 1, "one USER: every RUN and the container itself run as that user"
    workdir_at, workdir = next((i, args) for i, (op, args) in enumerate(ops) if op == "WORKDIR")
    # The default workspace is relative: the container's is WORKDIR/workspace. WORKDIR would create
    # a missing folder as root, so the user creates it first.
    workspace = PurePosixPath(workdir) / PipelineConfig.model_fields["workspace"].default
    made = [i for i, (op, args) in enumerate(ops) if op == "RUN" and "mkdir" in args and str(workspace) in args.split()]
    assert made and user_at[0] < made[0] < workdir_at
    assert all(i > user_at[0] for i, (op, _) in enumerate(ops) if op == "RUN")
    copies = [args for op, args in ops if op in ("COPY", "ADD")]
    assert copies and all(f"--chown={uid}:{gid}" in args.split() for args in copies)


def test_kuberay_pods_get_a_memory_backed_dev_shm():
    cluster, _ = _raycluster()
    for name, pod in _pod_templates(cluster).items():
        shm = _mounts(pod).get("/dev/shm")
        assert shm is not None, name
        assert shm.get("emptyDir", {}).get("medium") == "Memory", name


def test_kuberay_pods_share_one_writable_volume_as_the_image_user():
    cluster, docs = _raycluster()
    claims = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    uid, gid = _image_user()
    for name, pod in _pod_templates(cluster).items():
        shared = _mounts(pod).get(SHARED)
        assert shared is not None and not shared["readOnly"], name
        claim = claims[shared["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "pods on several nodes mount it at once"
        # Relative paths (the default `workspace`, `workspace/ray_results`) resolve on the share.
        assert pod["containers"][0]["workingDir"] == SHARED, name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid != 0, name
        assert security["runAsGroup"] == gid and security["fsGroup"] == gid, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_kuberay_exposes_nothing_without_the_token():
    cluster, docs = _raycluster()
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"  # GCS, client port and dashboard check the token
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] in LOOPBACK  # KubeRay's default is 0.0.0.0
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    for doc in docs:
        assert doc["kind"] not in ("Ingress", "Route"), doc["kind"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    for group in [head, *spec["workerGroupSpecs"]]:
        # The CRD declares rayStartParams as map[string]string: a bare number is rejected.
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())


def test_cluster_launcher_config_is_accepted_by_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_cluster_launcher())  # what `ray up` does before it connects anywhere
    validate_config(prepared)
    assert prepared["available_node_types"]["local.cluster.node"]["min_workers"] >= 1


def test_cluster_launcher_keeps_the_dashboard_on_loopback_behind_the_token():
    config = _cluster_launcher()
    assert "0.0.0.0" not in (INFRA / "ray" / "cluster.yaml").read_text()
    (start,) = [cmd for cmd in config["head_start_ray_commands"] if cmd.startswith("ray start")]
    options = _parse_ray(shlex.split(start)[1:])
    assert options["head"] and options["dashboard_host"] in LOOPBACK
    # The autoscaler on the head starts the workers only if it gets the config.
    assert options["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    docker = config["docker"]
    every_run_option = docker["run_options"] + docker.get("head_run_options", []) + docker.get("worker_run_options", [])
    assert not [opt for opt in every_run_option if re.match(r"(-p|--publish|--publish-all|-P)\b", opt)]
    assert "--env=RAY_AUTH_MODE=token" in docker["run_options"]  # head and workers alike
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_cluster_launcher_mounts_the_shared_volume_on_every_node():
    run_options = _cluster_launcher()["docker"]["run_options"]  # used for the head and the workers
    assert f"--volume={SHARED}:{SHARED}" in run_options
    assert f"--workdir={SHARED}" in run_options


def test_prefect_deployment_runs_the_flow_on_the_shared_volume():
    from prefect.utilities.importtools import import_object

    from flows.pipeline_config import PipelineConfig
    from flows.train_food import DEPLOYMENT_NAME, FLOW_NAME

    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert config["prefect-version"] == PINS["prefect"]
    (deployment,) = config["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    assert import_object(deployment["entrypoint"]).name == FLOW_NAME  # as the worker loads it
    parameters = PipelineConfig(**deployment["parameters"])
    assert PurePosixPath(parameters.workspace).is_relative_to(SHARED)
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": SHARED}}]
    # `prefect deploy` would freeze its own environment into these; they come from the worker's.
    env = deployment["work_pool"].get("job_variables", {}).get("env", {})
    assert not WORKER_ENV & set(env)


def _readme_commands() -> list[list[str]]:
    """Every shell command in infra/README.md's bash blocks, split at ;, &&, | and &."""
    text = (INFRA / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for word in [*lexer, ";"]:
                if word not in (";", "&&", "||", "|", "&"):
                    command.append(word)
                elif command:
                    commands.append(command)
                    command = []
    # Inline `kubectl exec ... -- COMMAND` examples in the prose count too.
    for inline in re.findall(r"`(kubectl exec [^`]+)`", text):
        commands.append(shlex.split(inline))
    return commands


def _inner(words: list[str]) -> list[str] | None:
    """The command that `ray exec`, `kubectl exec` or `env` runs, if that is what `words` is."""
    if words[:2] == ["ray", "exec"]:
        return shlex.split(words[3])
    if words[:2] == ["kubectl", "exec"] and "--" in words:
        return words[words.index("--") + 1:]
    if words[0] == "env":
        return list(itertools.dropwhile(lambda word: "=" in word, words[1:])) or None
    return None


def test_readme_commands_exist_in_the_pinned_clis():
    from prefect.cli._app import _app as prefect_app  # Prefect 3.9's cyclopts app

    from flows.cli.main import _build_parser

    checked: set[tuple[str, str]] = set()
    pending = _readme_commands()
    while pending:
        words = pending.pop()
        if inner := _inner(words):
            pending.append(inner)
        if words[0] == "ray":
            options = _parse_ray(words[1:])
            if words[1] == "start" and options["head"]:
                assert options["dashboard_host"] in LOOPBACK, shlex.join(words)
        elif words[0] == "train-food":
            try:
                _build_parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"`{shlex.join(words)}` does not parse")
        elif words[0] == "prefect":
            # Session options such as --no-prompt belong to the meta app, the rest to the command.
            try:
                _, session, _ = prefect_app.meta.parse_args(words[1:], exit_on_error=False, print_error=False)
                prefect_app.parse_args(list(session.arguments["tokens"]), exit_on_error=False, print_error=False)
            except Exception as err:  # cyclopts' errors share no base class worth naming here
                pytest.fail(f"`{shlex.join(words)}`: {err}")
        else:
            continue
        checked.add(tuple(words[:2]))
    # One walkthrough step each: a section that lost its commands fails here.
    assert {("ray", "start"), ("train-food", "run"), ("ray", "up"), ("ray", "exec"), ("ray", "dashboard"),
            ("prefect", "deploy"), ("prefect", "worker"), ("prefect", "deployment")} <= checked
    text = (INFRA / "README.md").read_text()
    for path in set(re.findall(r"\binfra/[\w./-]+\w", text)):
        assert (REPO / path).exists(), path
    assert "kubectl port-forward" in text
