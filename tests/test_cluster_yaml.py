"""cluster.yaml: a valid Ray autoscaler config (Ray's own schema, offline), node types with the
resources of their instance types (deploy/instance_types.yaml), token auth on every node, and a
head that, started with cluster.yaml's own command and environment, refuses the job API without
the token."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster.yaml"
INSTANCE_TYPES = ROOT / "deploy" / "instance_types.yaml"
LOOPBACK = {"127.0.0.1", "localhost"}


def _config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def resource_mismatches(config: dict, table: dict) -> list[str]:
    """Every node type whose declared CPU/GPU differ from its instance type's vCPUs/GPUs."""
    problems = []
    for name, node in config["available_node_types"].items():
        itype = node["node_config"]["InstanceType"]
        if itype not in table:
            problems.append(f"{name}: instance type {itype} is not in {INSTANCE_TYPES.name}")
            continue
        want = {"CPU": table[itype]["vcpus"], "GPU": table[itype]["gpus"]}
        got = {"CPU": node.get("resources", {}).get("CPU"), "GPU": node.get("resources", {}).get("GPU", 0)}
        if got != want:
            problems.append(f"{name} ({itype}): declares {got}, the instance has {want}")
    return problems


def container_env(config: dict, node: str) -> dict[str, str]:
    """The environment docker.run_options (plus head_/worker_run_options) give the Ray container."""
    docker = config.get("docker") or {}
    extra = docker.get("head_run_options" if node == "head" else "worker_run_options", [])
    env, args = {}, [a for opt in [*docker.get("run_options", []), *extra] for a in shlex.split(opt)]
    for i, arg in enumerate(args):
        if arg.startswith(("--env=", "-e=")):
            kv = arg.split("=", 1)[1]
        elif arg in ("--env", "-e") and i + 1 < len(args):
            kv = args[i + 1]
        else:
            continue
        key, _, value = kv.partition("=")
        env[key] = value
    return env


def ray_start_args(commands: list[str]) -> list[str]:
    """The arguments of the one `ray start` command in a list of start commands."""
    starts = [shlex.split(c) for c in commands if shlex.split(c)[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"expected one `ray start` in {commands}"
    return starts[0]


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def test_cluster_yaml_validates_against_ray_schema():
    prepared = prepare_config(_config())
    validate_config(prepared)  # raises jsonschema.ValidationError on a bad field
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(isinstance(v, int) for t in types.values() for v in t["resources"].values())
    # Nodes boot from the project's image: nothing is installed at boot.
    assert prepared["docker"]["image"].endswith("/chimera-ray:0.1.0")
    assert not any(prepared[k] for k in ("setup_commands", "head_setup_commands", "worker_setup_commands"))


def test_a_broken_cluster_yaml_is_rejected():
    config = _config()
    config["available_node_types"]["head"]["resources"] = {"CPU": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_node_resources_match_the_instance_table():
    table = yaml.safe_load(INSTANCE_TYPES.read_text())
    assert resource_mismatches(_config(), table) == []
    assert all(row["source"].startswith("https://aws.amazon.com/ec2/instance-types/") for row in table.values())


def test_half_a_node_is_caught():
    config = _config()
    config["available_node_types"]["gpu_a100x8"]["resources"] = {"CPU": 48, "GPU": 4}
    problems = resource_mismatches(config, yaml.safe_load(INSTANCE_TYPES.read_text()))
    assert problems == ["gpu_a100x8 (p4d.24xlarge): declares {'CPU': 48, 'GPU': 4}, the instance has "
                        "{'CPU': 96, 'GPU': 8}"]


def test_max_workers_buys_the_documented_gpus():
    """Each GPU type reaches 64 GPUs, and the cluster cap lets both do so at once."""
    config = _config()
    gpus = {name: t["max_workers"] * t["resources"]["GPU"]
            for name, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert all(g >= 64 for g in gpus.values()), gpus
    workers = sum(t.get("max_workers", 0) for n, t in config["available_node_types"].items() if n != "head")
    assert config["max_workers"] >= workers


def test_every_node_starts_ray_with_token_auth_and_a_loopback_dashboard():
    config = _config()
    for node, commands in (("head", "head_start_ray_commands"), ("worker", "worker_start_ray_commands")):
        assert container_env(config, node).get("RAY_AUTH_MODE") == "token", node
        for cmd in config[commands]:  # nothing turns it off again on the command line
            assert "RAY_AUTH_MODE=" not in cmd and "RAY_AUTH_TOKEN" not in cmd, cmd
    assert config["docker"]["image"], "the env above is the container's: docker must be on"
    # Every node gets the token at Ray's default path (the launcher copies file_mounts to all nodes).
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # The job API is reached through `ray dashboard cluster.yaml` (an SSH tunnel), never an open port.
    head = ray_start_args(config["head_start_ray_commands"])
    assert _flag(head, "--dashboard-host") in LOOPBACK, head
    assert "security_group" not in config["provider"]  # the launcher's own group: SSH only from outside


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _request(url: str, method: str = "GET", token: str | None = None) -> int:
    data = b'{"entrypoint": "echo pwned"}' if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _kill_instance(pgid: int, temp_dir: str) -> None:
    """Stops only the Ray this test started: its process group, then anything naming its temp dir."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for pid in Path("/proc").iterdir():
            try:
                if pid.name.isdigit() and temp_dir.encode() in (pid / "cmdline").read_bytes():
                    os.kill(int(pid.name), sig)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(2)


@pytest.mark.slow
def test_a_head_started_as_cluster_yaml_says_refuses_the_job_api_without_the_token():
    """Starts a head with cluster.yaml's head `ray start` and its container environment (the token
    where file_mounts puts it, ~/.ray/auth_token), on loopback with free ports and a private temp
    dir, then calls the job API: without a token, with a wrong one, with the right one."""
    config = _config()
    args = ray_start_args(config["head_start_ray_commands"])
    assert "--head" in args
    temp_dir = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's socket paths have a limit
    home = Path(temp_dir) / "home"
    token = os.urandom(24).hex()
    for target in config["file_mounts"]:  # the file_mounts a node gets below ~ land in our HOME
        if target.startswith("~/") and target.endswith("auth_token"):
            (home / target[2:]).parent.mkdir(parents=True, exist_ok=True)
            (home / target[2:]).write_text(token)
    gcs, om, nm, dash, agent, agent_grpc, client, rt_env, metrics = _free_ports(9)
    drop = ("--port", "--object-manager-port", "--autoscaling-config")
    keep = [a for a in args[2:] if not a.startswith(drop)]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", *keep,
           f"--port={gcs}", f"--object-manager-port={om}", f"--node-manager-port={nm}",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
           "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(container_env(config, "head"), HOME=str(home))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        host = _flag(args, "--dashboard-host")
        url = f"http://{'127.0.0.1' if host in LOOPBACK else host}:{dash}/api/jobs/"
        deadline = time.time() + 60
        while True:
            try:
                status = _request(url, token=token)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, f"the dashboard did not answer on {url}\n{out}"
                time.sleep(1)
        assert status == 200, f"the job API refused the nodes' token ({status})"
        open_ = "the job API accepts requests without the token: cluster.yaml's head is open to all"
        assert _request(url) == 401, open_
        assert _request(url, "POST") == 401, open_  # a job submission (runs code) without a token
        assert _request(url, "POST", token="not-the-token") == 403, open_
        # The README's client side: RAY_AUTH_MODE=token and the token at ~/.ray/auth_token.
        client = subprocess.run([cmd[0], "job", "list", "--address", url.removesuffix("/api/jobs/")],
                                env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stdout + client.stderr
    finally:
        _kill_instance(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
