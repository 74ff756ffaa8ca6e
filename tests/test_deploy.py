"""deploy/: the KubeRay manifests (kustomize overlays) and the container image, checked offline.

Every overlay must render with `kubectl kustomize`; every ray.io object must validate against the KubeRay
v1.7.0 CRD schema (from ../shared, with unknown keys rejected), every core object with kubernetes-validate
(strict); the Ray pods must follow the GPU conventions (docs: shared/docs/ecosystem-conventions.md, section 3);
and one Ray version must be named everywhere: pyproject.toml, the Dockerfile, every rayVersion, every image tag
and the installed Ray.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MODELS_LOADER = K8S / "models-loader.yaml"
# shared/ lies beside the repository (CI keeps a copy of it beside the clone).
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
OVERLAYS = ("raycluster", "rayjob")
KUBERNETES_VERSION = "1.33"  # one of the versions kubernetes-validate ships schemas for
GPU = "nvidia.com/gpu"
PORTS = {"head": {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}, "worker": {"metrics": 8080}}


# ---------------------------------------------------------------------------------------------- helpers


def pyproject() -> dict[str, str]:
    """Version, requires-python, the Ray pin and the package list (read as text: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()

    def one(pattern: str) -> str:
        found = re.findall(pattern, text, flags=re.MULTILINE)
        assert len(found) == 1, f"pyproject.toml: expected one match of {pattern!r}, found {found}"
        return found[0]

    return {
        "version": one(r'^version\s*=\s*"([^"]+)"'),
        "requires_python": one(r'^requires-python\s*=\s*"([^"]+)"'),
        "ray": one(r'"ray\[default\]==([0-9][0-9a-z.]*)"'),
        "packages": one(r"^\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]"),
    }


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: the deploy tests render deploy/k8s/overlays/* with `kubectl kustomize`; "
            "install kubectl (it includes kustomize, e.g. Debian's kubectl package) and rerun"
        )
    return path


@functools.lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize deploy/k8s/overlays/<overlay>` prints."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    objects = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert objects, f"overlays/{overlay} renders nothing"
    return objects


def objects(overlay: str) -> list[dict]:
    return copy.deepcopy(list(rendered(overlay)))


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for every RayCluster and every RayJob's rayClusterSpec."""
    specs = []
    for doc in docs:
        if doc["kind"] == "RayCluster":
            specs.append((f"RayCluster/{doc['metadata']['name']}", doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((f"RayJob/{doc['metadata']['name']}.rayClusterSpec", doc["spec"]["rayClusterSpec"]))
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    """("head" | "worker", group spec) for the head group and every worker group."""
    return [("head", spec["headGroupSpec"])] + [("worker", group) for group in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def gpu_count(container: dict) -> int:
    resources = container.get("resources", {})
    return int(resources.get("limits", {}).get(GPU, 0) or resources.get("requests", {}).get(GPU, 0))


def quantity(value) -> float:
    """A Kubernetes quantity ("64Gi", "500m", "16", 8589934592) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match[2] in units or not match[2]), f"not a quantity: {value!r}"
    return float(match[1]) * units.get(match[2], 1)


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, strict: bool) -> jsonschema.Draft7Validator:
    path = CRD_DIR / CRD_FILES[kind]
    assert path.is_file(), f"{path} is missing: the KubeRay CRDs are read from shared/ beside the repository"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1-2 MB each
    (version,) = [version for version in crd["spec"]["versions"] if version.get("storage")]
    assert version["name"] == "v1"
    schema = version["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(forbid_unknown_keys(schema) if strict else schema)


def forbid_unknown_keys(schema):
    """A copy where every object schema with `properties` and no x-kubernetes-preserve-unknown-fields rejects
    keys it does not name (what the API server's pruning would silently drop)."""
    if isinstance(schema, list):
        return [forbid_unknown_keys(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: forbid_unknown_keys(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict.setdefault("additionalProperties", False)
    return strict


def crd_errors(doc: dict, strict: bool = True) -> list[str]:
    errors = crd_validator(doc["kind"], strict).iter_errors(doc)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]


def core_errors(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.path))}: {error.message}"
    return None


# ---------------------------------------------------------------------------------------------- rendering


def test_overlays_render_the_expected_objects():
    kinds = {
        overlay: sorted(f"{doc['kind']}/{doc['metadata']['name']}" for doc in objects(overlay)) for overlay in OVERLAYS
    }
    common = ["PersistentVolumeClaim/freescale-models", "PersistentVolumeClaim/freescale-outputs", "NetworkPolicy/freescale-ray"]
    assert kinds["raycluster"] == sorted(common + ["RayCluster/freescale"])
    # The rayjob overlay borrows the base RayCluster's spec and must not also create that cluster.
    assert kinds["rayjob"] == sorted(common + ["RayJob/freescale-poster"])
    for overlay in OVERLAYS:
        for doc in objects(overlay):
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "freescale-poster", (overlay, doc["kind"])
            assert "namespace" not in doc["metadata"], "the namespace is chosen at apply time (-n)"


def test_the_rayjob_cluster_is_the_base_cluster():
    """The job's rayClusterSpec is copied from the one written cluster: only sizing and autoscaling differ."""
    (farm,) = [spec for _, spec in cluster_specs(objects("raycluster"))]
    (job,) = [spec for _, spec in cluster_specs(objects("rayjob"))]
    for spec in (farm, job):
        spec.pop("enableInTreeAutoscaling")
        spec.pop("autoscalerOptions", None)
        for group in spec["workerGroupSpecs"]:
            for key in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(key)
    assert job == farm


# ---------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_match_the_kuberay_crds_strictly(overlay):
    docs = [doc for doc in objects(overlay) if doc["apiVersion"].startswith("ray.io/")]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", "ray.io/v1 is KubeRay's storage version"
        assert crd_errors(doc, strict=True) == [], f"{overlay}: {doc['kind']} does not match the CRD"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_with_kubernetes_validate(overlay):
    docs = [doc for doc in objects(overlay) if not doc["apiVersion"].startswith("ray.io/")]
    assert docs
    for doc in docs:
        # A kind without a schema raises SchemaNotFoundError here: nothing passes unchecked.
        assert core_errors(doc) is None, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {core_errors(doc)}"
        if doc["kind"] == "PersistentVolumeClaim":  # the schema takes any string as a quantity
            assert quantity(doc["spec"]["resources"]["requests"]["storage"]) > 0


def test_strict_crd_validation_rejects_what_kubernetes_would_drop():
    """A misspelt key passes the plain CRD schema (the API server would prune it silently), not the strict one."""
    (cluster,) = [doc for doc in objects("raycluster") if doc["kind"] == "RayCluster"]
    pod = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["toleration"] = pod.pop("tolerations")
    assert crd_errors(cluster, strict=False) == []
    errors = crd_errors(cluster, strict=True)
    assert errors and any("toleration" in error for error in errors), errors

    (job,) = [doc for doc in objects("rayjob") if doc["kind"] == "RayJob"]
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert crd_errors(job, strict=False) == []
    assert any("shutdownAfterJobFinish" in error for error in crd_errors(job, strict=True))


def test_crd_validation_rejects_wrong_types_and_missing_required_fields():
    (cluster,) = [doc for doc in objects("raycluster") if doc["kind"] == "RayCluster"]
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert crd_errors(wrong_type, strict=False)
    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert crd_errors(missing, strict=False)
    bad_port = copy.deepcopy(cluster)
    ray_container(bad_port["spec"]["headGroupSpec"])["ports"][0]["containerPort"] = "eighty"
    assert crd_errors(bad_port, strict=False)


def test_kubernetes_validate_rejects_a_broken_claim():
    (claim,) = [doc for doc in objects("raycluster") if doc["metadata"]["name"] == "freescale-models"]
    broken = copy.deepcopy(claim)
    broken["spec"]["accessModes"] = "ReadOnlyMany"  # a string, not a list
    assert core_errors(broken)
    unknown = copy.deepcopy(claim)
    unknown["spec"]["storageClass"] = "nfs"  # storageClassName
    assert core_errors(unknown)
    assert core_errors(claim) is None


# ---------------------------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_is_cpu_only_and_serves_ray(overlay):
    for where, spec in cluster_specs(objects(overlay)):
        head = spec["headGroupSpec"]
        for container in head["template"]["spec"]["containers"]:
            for part in ("requests", "limits"):
                assert GPU not in container.get("resources", {}).get(part, {}), f"{where}: GPU on the head"
        assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: the head must advertise no GPUs to Ray"
        assert head["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.present") is None
        # the job server's processes end there: an init (the pause container) must reap what they orphan
        assert head["template"]["spec"].get("shareProcessNamespace") is True, f"{where}: no zombie reaper on the head"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_worker_groups_follow_the_gpu_conventions(overlay):
    for where, spec in cluster_specs(objects(overlay)):
        gpu_groups = [group for kind, group in groups(spec) if kind == "worker" and gpu_count(ray_container(group))]
        assert gpu_groups, f"{where}: no GPU worker group"
        names = [group["groupName"] for _, group in groups(spec) if "groupName" in group]
        assert len(names) == len(set(names)), f"{where}: worker group names repeat: {names}"
        for group in gpu_groups:
            container = ray_container(group)
            resources = container["resources"]
            # KubeRay derives --num-gpus from the limit; the scheduler reserves the request.
            assert resources["limits"][GPU] == resources["requests"][GPU], f"{where}/{group['groupName']}"
            for part in ("cpu", "memory"):
                assert quantity(resources["limits"][part]) == quantity(resources["requests"][part])
            pod = group["template"]["spec"]
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", [])
            assert pod.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true"
            assert "num-gpus" not in group.get("rayStartParams", {}), "num-gpus comes from the GPU limit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_has_shm_volumes_env_and_ports(overlay):
    docs = objects(overlay)
    claims = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    for where, spec in cluster_specs(docs):
        for kind, group in groups(spec):
            label = f"{where}/{group.get('groupName', 'head')}"
            pod = group["template"]["spec"]
            container = ray_container(group)
            volumes = {volume["name"]: volume for volume in pod["volumes"]}
            mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}

            shm = volumes[mounts["/dev/shm"]["name"]]
            assert shm["emptyDir"]["medium"] == "Memory", label
            memory = quantity(container["resources"]["limits"]["memory"])
            shm_size = quantity(shm["emptyDir"]["sizeLimit"])
            assert shm_size < memory, f"{label}: /dev/shm counts against the memory limit"
            store = group.get("rayStartParams", {}).get("object-store-memory")
            if store is not None:  # Ray moves the object store to disk when /dev/shm is smaller
                assert quantity(store) < shm_size, label

            models = mounts["/models"]
            assert models.get("readOnly") is True, f"{label}: models must be mounted read-only"
            claim = volumes[models["name"]]["persistentVolumeClaim"]
            assert claim.get("readOnly") is True and claim["claimName"] in claims, label
            outputs = mounts["/outputs"]
            assert not outputs.get("readOnly"), label
            assert volumes[outputs["name"]]["persistentVolumeClaim"]["claimName"] in claims, label

            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert env.get("HF_HOME") == "/models" and env.get("HF_HUB_OFFLINE") == "1", label

            ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
            for name, number in PORTS[kind].items():
                assert ports.get(name) == number, f"{label}: port {name} must be {number}, found {ports}"
            metrics_port = group.get("rayStartParams", {}).get("metrics-export-port")
            assert metrics_port in (None, str(ports["metrics"])), label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_claims_can_be_mounted_by_pods_on_many_nodes(overlay):
    for doc in objects(overlay):
        if doc["kind"] == "PersistentVolumeClaim":
            assert set(doc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replica_bounds_and_names(overlay):
    docs = objects(overlay)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        if doc["kind"] in ("RayCluster", "RayJob"):
            # KubeRay derives Service and Pod names from these (a RayJob's cluster adds a suffix).
            assert len(name) <= 40, name
    for where, spec in cluster_specs(docs):
        for _, group in groups(spec)[1:]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: {group}"


def test_render_farm_autoscales_and_can_host_a_full_render():
    (spec,) = [spec for _, spec in cluster_specs(objects("raycluster"))]
    assert spec["enableInTreeAutoscaling"] is True
    gpus = sum(group["maxReplicas"] * gpu_count(ray_container(group)) for _, group in groups(spec)[1:])
    assert gpus >= 8, "the farm must be able to grow to an 8-GPU render (--workers 8)"


def test_rayjob_renders_one_poster_on_an_ephemeral_cluster(tmp_path):
    from renderer.cli.options import build_parser, request_from_args

    (job,) = [doc for doc in objects("rayjob") if doc["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert "clusterSelector" not in spec, "rayClusterSpec and clusterSelector exclude each other"

    cluster = spec["rayClusterSpec"]
    head = ray_container(cluster["headGroupSpec"])
    head_cpus = quantity(head["resources"]["limits"]["cpu"])
    assert 0 < spec["entrypointNumCpus"] <= head_cpus, "the driver must fit on the head"

    # The entrypoint is one plain freescale-render command line, exec'd (README: Stopping), that the CLI accepts.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["exec", "freescale-render"] and not set(argv) & {"&&", ";", "|", "--"}, argv
    args = build_parser().parse_args(argv[2:])
    assert args.model.startswith("/models/")
    assert Path(args.out).parent == Path("/outputs"), "the output folder must exist: the root of the outputs volume"
    assert args.size == "8192x8192"
    request_from_args(args.__class__(**{**vars(args), "out": tmp_path / Path(args.out).name}))

    # A fixed cluster of exactly --workers GPUs, so that KubeRay submits once the render's GPUs all run.
    assert cluster["enableInTreeAutoscaling"] is False
    workers = [group for _, group in groups(cluster)[1:]]
    assert all(group["minReplicas"] == group["replicas"] == group["maxReplicas"] for group in workers)
    gpus = sum(group["replicas"] * gpu_count(ray_container(group)) for group in workers)
    assert args.gpus_per_worker == 1, "GPU bundles must not depend on what the cluster has at submission time"
    assert args.workers == gpus, f"--workers {args.workers} on a cluster of {gpus} GPUs"


def test_models_loader_writes_the_claim_the_ray_pods_read():
    pod = yaml.safe_load(MODELS_LOADER.read_text())
    assert core_errors(pod) is None, core_errors(pod)
    container = pod["spec"]["containers"][0]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/models"]
    assert not mount.get("readOnly"), "the loader fills the models volume"
    (volume,) = [volume for volume in pod["spec"]["volumes"] if volume["name"] == mount["name"]]
    assert not volume["persistentVolumeClaim"].get("readOnly")
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    assert env.get("HF_HOME") == "/models", "hub downloads must land where the Ray pods look (HF_HOME)"
    for overlay in OVERLAYS:
        for where, spec in cluster_specs(objects(overlay)):
            for _, group in groups(spec):
                pod_spec = group["template"]["spec"]
                (read,) = [m for m in ray_container(group)["volumeMounts"] if m["mountPath"] == "/models"]
                (claim,) = [v["persistentVolumeClaim"] for v in pod_spec["volumes"] if v["name"] == read["name"]]
                assert claim["claimName"] == volume["persistentVolumeClaim"]["claimName"], where


# ---------------------------------------------------------------------------------------------- versions


def test_one_ray_version_everywhere():
    import ray

    project = pyproject()
    ray_version = project["ray"]
    assert ray.__version__ == ray_version, f"installed Ray {ray.__version__}, pyproject pins {ray_version}"
    assert dockerfile_args()["RAY_VERSION"] == ray_version

    images = set()
    for overlay in OVERLAYS:
        for where, spec in cluster_specs(objects(overlay)):
            assert spec["rayVersion"] == ray_version, f"{overlay}: {where}.rayVersion"
            for _, group in groups(spec):
                images |= {container["image"] for container in group["template"]["spec"]["containers"]}
    images |= {container["image"] for container in yaml.safe_load(MODELS_LOADER.read_text())["spec"]["containers"]}
    assert len(images) == 1, f"one image for head, workers and the models loader, found {images}"
    (image,) = images
    tag = r"(?P<tag>freescale-poster:(?P<version>[^-]+)-ray(?P<ray>[0-9.]+)-cuda(?P<cuda>[0-9]+))"
    match = re.fullmatch(rf"(?:.+/)?{tag}", image)
    assert match, f"image {image!r} should be [REGISTRY/]freescale-poster:<version>-ray<ray>-cuda<major>"
    assert match["ray"] == ray_version and match["version"] == project["version"], image
    base = dockerfile_args()["BASE_IMAGE"]
    assert re.search(rf"-cuda{match['cuda']}\.", base), f"tag says CUDA {match['cuda']}, base image is {base}"
    assert f"-t {match['tag']} " in DOCKERFILE.read_text(), "the Dockerfile's build command should make the manifests' tag"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_installs_this_package_without_weights():
    project = pyproject()
    instructions = dockerfile_instructions()
    python = dockerfile_args()["PYTHON_VERSION"]
    assert SpecifierSet(project["requires_python"]).contains(python), (
        f"the image's Python {python} does not satisfy requires-python {project['requires_python']}"
    )
    assert ("FROM", "${BASE_IMAGE}") in instructions
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    # The package is installed from its pyproject.toml, so Ray comes from its pin: no second Ray install.
    assert "pip install" in runs and not re.search(r"pip install[^&]*\bray\b", runs), runs
    sources = [
        part
        for instruction, arguments in instructions
        if instruction == "COPY"
        for part in arguments.split()[:-1]
        if not part.startswith("--")
    ]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    packages = {name.rstrip("*") for name in re.findall(r'"([^"]+)"', project["packages"])}
    assert packages and packages <= set(sources), f"packages not copied into the image: {packages - set(sources)}"
    # Weights come from the models volume at run time, never from the build.
    for download in ("huggingface-cli", "hf download", "snapshot_download", "from_pretrained", ".safetensors"):
        assert download not in runs, download
    env = dict(
        item.split("=", 1)
        for instruction, arguments in instructions
        if instruction == "ENV"
        for item in arguments.split()
    )
    assert env.get("HF_HOME") == "/models" and env.get("HF_HUB_OFFLINE") == "1", env
