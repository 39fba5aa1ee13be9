"""The deployment files: the Dockerfile's pins match pyproject.toml and the Makefile, the KubeRay
manifests pass KubeRay's own CRD schema (vendored, deploy/kuberay/crds/), and every placeholder
the files hold is explained in the README's "On a cluster"."""

import functools
import hashlib
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = {"RayJob": KUBERAY / "rayjob.yaml", "RayCluster": KUBERAY / "raycluster.yaml"}
CRDS = {"RayJob": KUBERAY / "crds" / "ray.io_rayjobs.yaml", "RayCluster": KUBERAY / "crds" / "ray.io_rayclusters.yaml"}
PLACEHOLDER = re.compile(r"\bYOUR_[A-Z_]+\b")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    (pin,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return pin.split("==")[1]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        op, _, args = current.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        current = ""
    return out


def _dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def test_dockerfile_base_is_rays_gpu_image_of_the_pinned_ray_and_a_supported_python():
    (base,) = [args for op, args in _dockerfile() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>3)(?P<minor>\d+)-gpu", base)
    assert match, f"expected Ray's GPU image rayproject/ray:<ray>-py3XX-gpu, got {base}"
    assert match["ray"] == _ray_pin()
    python = f"{match['py']}.{match['minor']}"
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(python + ".0"), python


def test_dockerfile_installs_as_the_readme_does():
    """torch first (the Makefile's TORCH_SPEC), then the project itself: no second list of dependencies."""
    ops = _dockerfile()
    args = dict(a.split("=", 1) for op, a in ops if op == "ARG" and "=" in a)
    makefile_spec = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert args["TORCH_SPEC"].strip('"') == makefile_spec
    readme = (ROOT / "README.md").read_text()
    assert "install your CUDA torch" in readme and "build first" in readme  # the README's recipe
    installs = [shlex.split(cmd) for op, a in ops if op == "RUN" for cmd in a.split("&&")
                if shlex.split(cmd)[:2] == ["pip", "install"]]
    targets = [[w for w in cmd[2:] if not w.startswith("-")] for cmd in installs]
    assert targets == [["${TORCH_SPEC}"], ["."]], targets
    copied = {w for op, a in ops if op == "COPY" for w in shlex.split(a) if not w.startswith("--")}
    assert {"pyproject.toml", "chimera_ray", "jobs"} <= copied
    (workdir,) = [a for op, a in ops if op == "WORKDIR"]
    assert workdir == "/home/ray/chimera-ray"  # where the job commands name jobs/full.py


def test_every_deployment_runs_the_projects_image_and_its_jobs():
    image = f"YOUR_REGISTRY/chimera-ray:{_pyproject()['project']['version']}"
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"] == image
    for kind, path in MANIFESTS.items():
        spec = yaml.safe_load(path.read_text())["spec"]
        cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        assert {c["image"] for p in pods for c in p["template"]["spec"]["containers"]} == {image}, kind
        assert cluster["rayVersion"] == _ray_pin()


@functools.cache
def _crd_schema(kind: str) -> dict:
    crd = yaml.load(CRDS[kind].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_crd_schema(kind))  # OpenAPI v3.0 schemas are draft-4 style


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server's strict field validation refuses them;
    jsonschema alone lets them through, since CRD schemas do not say additionalProperties: false)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and path:  # the root's metadata is ObjectMeta, checked elsewhere
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_manifest(manifest: dict) -> None:
    """Raises jsonschema.ValidationError (types, enums, required) or ValueError (unknown fields)."""
    kind = manifest["kind"]
    assert manifest["apiVersion"] == "ray.io/v1"
    schema = _crd_schema(kind)
    _validator(kind).validate(manifest)
    extra = unknown_fields({k: v for k, v in manifest.items() if k != "metadata"}, schema)
    if extra:
        raise ValueError(f"{kind}: fields KubeRay's CRD does not define: {extra}")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_passes_kuberays_crd_schema(kind):
    manifest = yaml.safe_load(MANIFESTS[kind].read_text())
    assert manifest["kind"] == kind
    validate_manifest(manifest)


@pytest.mark.parametrize("breakage, error", [
    (lambda s: s.update(shutdownAfterJobFinish=True), ValueError),  # a typo the API server rejects
    (lambda s: s.update(backoffLimit="two"), jsonschema.ValidationError),
    (lambda s: s["rayClusterSpec"]["authOptions"].update(mode="tokens"), jsonschema.ValidationError),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), jsonschema.ValidationError),
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(imagePullPolicy=3), jsonschema.ValidationError),
])
def test_a_broken_manifest_is_rejected(breakage, error):
    manifest = yaml.safe_load(MANIFESTS["RayJob"].read_text())
    breakage(manifest["spec"])
    with pytest.raises(error):
        validate_manifest(manifest)


def test_rayjob_runs_the_main_job_with_token_auth_and_gpu_workers_from_zero():
    spec = yaml.safe_load(MANIFESTS["RayJob"].read_text())["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["python", "/home/ray/chimera-ray/jobs/full.py"] and (ROOT / "jobs" / "full.py").exists()
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config.removeprefix("/home/ray/chimera-ray/")).exists(), config
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "chimera-ray-auth"}
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 64
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The interactive RayCluster is the same cluster.
    assert yaml.safe_load(MANIFESTS["RayCluster"].read_text())["spec"] == cluster


def test_vendored_crds_are_the_ones_the_readme_names():
    notes = (KUBERAY / "crds" / "README.md").read_text()
    assert "v1.7.0" in notes and "https://github.com/ray-project/kuberay" in notes
    for path in CRDS.values():
        assert f"| {path.name} | {hashlib.sha256(path.read_bytes()).hexdigest()} |" in notes, path.name


def _on_a_cluster() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]


def test_every_placeholder_is_explained_in_the_readme():
    section = _on_a_cluster()
    files = [ROOT / "cluster.yaml", ROOT / "Dockerfile", *MANIFESTS.values()]
    used = {p for f in files for p in PLACEHOLDER.findall(f.read_text())}
    assert used, "expected placeholders such as YOUR_BUCKET"
    table = {m[1] for m in re.finditer(r"^\| `(YOUR_[A-Z_]+)` \|", section, re.M)}
    assert used <= table, f"placeholders without a README row saying where the value comes from: {used - table}"
    assert not PLACEHOLDER.findall(section) or set(PLACEHOLDER.findall(section)) <= used | table


def test_readme_walks_both_paths():
    section = _on_a_cluster()
    for needed in ("ray get-auth-token --generate", "ray up cluster.yaml", "ray dashboard cluster.yaml",
                   "RAY_AUTH_MODE=token", "ray job submit", "ray job logs", "docker build", "docker push",
                   "kubectl create secret generic chimera-ray-auth", "deploy/kuberay/rayjob.yaml",
                   "deploy/kuberay/raycluster.yaml", "kubectl port-forward", "index.json"):
        assert needed in section, needed
