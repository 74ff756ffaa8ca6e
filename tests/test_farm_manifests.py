"""The farm's manifests beyond one poster: the Kueue overlay, the batch RayJob, token authentication and the
NetworkPolicy (rendered with `kubectl kustomize`, validated strictly against the Kueue v0.19.2 and KubeRay v1.7.0
CRDs and with kubernetes-validate)."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from test_deploy import GPU, cluster_specs, core_errors, crd_errors, forbid_unknown_keys, groups, objects, quantity, ray_container

KUEUE_CRDS = Path(__file__).resolve().parents[2] / "shared" / "kueue-crds-v0.19.2"
KUEUE_KINDS = {"ClusterQueue": "clusterqueues", "LocalQueue": "localqueues", "ResourceFlavor": "resourceflavors",
               "WorkloadPriorityClass": "workloadpriorityclasses"}
ALL_OVERLAYS = ("raycluster", "rayjob", "kueue", "rayjob-batch")


@functools.lru_cache(maxsize=None)
def kueue_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    path = KUEUE_CRDS / f"kueue.x-k8s.io_{KUEUE_KINDS[kind]}.yaml"
    assert path.is_file(), f"{path} is missing: the Kueue CRDs are read from shared/ beside the repository"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    return jsonschema.Draft7Validator(forbid_unknown_keys(served["schema"]["openAPIV3Schema"]))


def kueue_errors(doc: dict) -> list[str]:
    version = doc["apiVersion"].split("/")[1]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in kueue_validator(doc["kind"], version).iter_errors(doc)]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_the_kueue_overlay_renders_the_queue_and_the_labelled_rayjob():
    docs = objects("kueue")
    kinds = sorted(f"{doc['kind']}/{doc['metadata']['name']}" for doc in docs)
    assert kinds == sorted([
        "ClusterQueue/freescale-gpu-pool", "LocalQueue/freescale", "ResourceFlavor/cpu-nodes", "ResourceFlavor/gpu-nodes",
        "WorkloadPriorityClass/interactive-proof", "WorkloadPriorityClass/overnight-batch", "NetworkPolicy/freescale-ray",
        "PersistentVolumeClaim/freescale-models", "PersistentVolumeClaim/freescale-outputs", "RayJob/freescale-poster"])
    for doc in docs:
        if doc["apiVersion"].startswith("kueue.x-k8s.io/"):
            assert doc["apiVersion"] == "kueue.x-k8s.io/v1beta2", "v1beta2 is Kueue v0.19's storage version"
            assert kueue_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}: {kueue_errors(doc)}"
        elif doc["apiVersion"].startswith("ray.io/"):
            assert crd_errors(doc, strict=True) == [], doc["kind"]
        else:
            assert core_errors(doc) is None, f"{doc['kind']}: {core_errors(doc)}"


def test_strict_kueue_validation_rejects_an_unknown_field():
    (queue,) = by_kind(objects("kueue"), "ClusterQueue")
    queue["spec"]["queueingStrategie"] = "StrictFIFO"
    assert any("queueingStrategie" in error for error in kueue_errors(queue))


def test_the_rayjob_has_what_kueue_requires_of_it():
    docs = objects("kueue")
    (job,) = by_kind(docs, "RayJob")
    labels = job["metadata"]["labels"]
    (local,) = by_kind(docs, "LocalQueue")
    assert labels["kueue.x-k8s.io/queue-name"] == local["metadata"]["name"]
    assert labels["kueue.x-k8s.io/priority-class"] in {doc["metadata"]["name"] for doc in by_kind(docs, "WorkloadPriorityClass")}
    spec = job["spec"]
    assert spec["suspend"] is True, "created suspended: Kueue starts it when admitted"
    assert spec["shutdownAfterJobFinishes"] is True, "Kueue admits only a RayJob whose cluster ends with it"
    assert "clusterSelector" not in spec, "a Kueue-managed RayJob cannot use an existing cluster"
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False, "Kueue reserves the cluster's pods as written"
    assert len(spec["rayClusterSpec"]["workerGroupSpecs"]) <= 7, "a Workload has at most 8 pod sets"


def test_the_queue_orders_by_priority_and_lets_proofs_preempt_batches():
    docs = objects("kueue")
    (queue,) = by_kind(docs, "ClusterQueue")
    (local,) = by_kind(docs, "LocalQueue")
    assert local["spec"]["clusterQueue"] == queue["metadata"]["name"]
    assert queue["spec"]["queueingStrategy"] == "StrictFIFO"
    assert queue["spec"]["preemption"]["withinClusterQueue"] == "LowerPriority"
    priority = {doc["metadata"]["name"]: doc["value"] for doc in by_kind(docs, "WorkloadPriorityClass")}
    assert priority["interactive-proof"] > priority["overnight-batch"]


def pod_requests(job: dict) -> list[tuple[dict, int]]:
    """(requests, count) of every pod of the RayJob: head, workers, submitter."""
    spec = job["spec"]
    pods = [(ray_container(group)["resources"]["requests"], group.get("replicas", 1)) for _, group in groups(spec["rayClusterSpec"])]
    pods.append((spec["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["requests"], 1))
    return pods


def test_the_quota_holds_a_whole_poster_and_covers_what_its_pods_ask():
    docs = objects("kueue")
    (queue,) = by_kind(docs, "ClusterQueue")
    (job,) = by_kind(docs, "RayJob")
    (group,) = queue["spec"]["resourceGroups"]
    flavors = {flavor["name"]: {r["name"]: quantity(r["nominalQuota"]) for r in flavor["resources"]} for flavor in group["flavors"]}
    assert set(group["coveredResources"]) == {"cpu", "memory", GPU}
    assert flavors["cpu-nodes"][GPU] == 0, "GPU pods must not take the CPU flavor"
    (gpu_flavor,) = [doc for doc in by_kind(docs, "ResourceFlavor") if doc["metadata"]["name"] == "gpu-nodes"]
    assert gpu_flavor["spec"]["nodeLabels"] == {"nvidia.com/gpu.present": "true"}
    used = {"cpu-nodes": dict.fromkeys(group["coveredResources"], 0.0), "gpu-nodes": dict.fromkeys(group["coveredResources"], 0.0)}
    for requests, count in pod_requests(job):
        assert set(requests) <= set(group["coveredResources"]), f"a resource outside the queue's quota: {requests}"
        flavor = "gpu-nodes" if quantity(requests.get(GPU, 0)) else "cpu-nodes"
        for name in group["coveredResources"]:
            used[flavor][name] += quantity(requests.get(name, 0)) * count
    for flavor, needs in used.items():
        for name, amount in needs.items():
            assert amount <= flavors[flavor][name], f"one poster needs {amount} {name} of {flavor}, the quota is {flavors[flavor][name]}"


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_ray_cluster_turns_token_authentication_on(overlay):
    specs = cluster_specs(objects(overlay))
    assert specs
    for where, spec in specs:
        assert spec.get("authOptions") == {"mode": "token"}, where


def test_the_rayjob_submitter_may_reach_the_jobs_api():
    (job,) = by_kind(objects("rayjob"), "RayJob")
    template = job["spec"]["submitterPodTemplate"]
    assert template["metadata"]["labels"]["freescale.example/submitter"] == "true"
    (image,) = {c["image"] for _, group in groups(job["spec"]["rayClusterSpec"]) for c in group["template"]["spec"]["containers"]}
    assert template["spec"]["containers"][0]["image"] == image
    assert "command" not in template["spec"]["containers"][0], "KubeRay fills in `ray job submit`"


def allowed(policy: dict, port: int) -> list[dict]:
    """The peers (`from` entries) that the policy lets reach `port`."""
    peers = []
    for rule in policy["spec"]["ingress"]:
        ports = {entry["port"] for entry in rule.get("ports", [])}
        if not ports or port in ports:
            peers.extend(rule.get("from", []))
    return peers


def test_the_network_policy_admits_ray_jobs_and_metrics_only_from_whom_it_should():
    (policy,) = by_kind(objects("raycluster"), "NetworkPolicy")
    assert core_errors(policy) is None
    own = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "freescale-poster"}}}
    assert policy["spec"]["podSelector"] == own["podSelector"] and policy["spec"]["policyTypes"] == ["Ingress"]
    (cluster,) = [doc for doc in objects("raycluster") if doc["kind"] == "RayCluster"]
    for _, group in groups(cluster["spec"]):
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "freescale-poster"  # the policy covers them
    submitter = {"freescale.example/submitter": "true"}
    gcs = allowed(policy, 6379)
    assert gcs == [own], "Ray's own ports: the release's pods only"
    jobs_api = allowed(policy, 8265)
    assert jobs_api == [own, {"podSelector": {"matchLabels": submitter}}, {"namespaceSelector": {"matchLabels": submitter}},
                        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    metrics = allowed(policy, 8080)
    assert metrics == [own, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert all(rule.get("from") for rule in policy["spec"]["ingress"]), "no rule open to everyone"


def test_the_network_policy_check_sees_an_open_port():
    (policy,) = by_kind(objects("raycluster"), "NetworkPolicy")
    policy["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]})
    assert {} not in allowed(policy, 8265) and not all(rule.get("from") for rule in policy["spec"]["ingress"])


def test_the_batch_rayjob_renders_its_configmap_batch_file_on_the_head(tmp_path):
    docs = objects("rayjob-batch")
    for doc in docs:
        errors = crd_errors(doc, strict=True) if doc["apiVersion"].startswith("ray.io/") else core_errors(doc)
        assert not errors, f"{doc['kind']}: {errors}"
    (job,) = by_kind(docs, "RayJob")
    (config,) = by_kind(docs, "ConfigMap")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["exec", "freescale-render", "batch", "/inputs/night.jsonl"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/inputs"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config["metadata"]["name"] and mount["readOnly"] is True
    # Every line is a poster the renderer accepts, checked as `freescale-render batch` checks it (the model and
    # output folders stand in here: sdxl-random has SDXL's shapes, tmp_path is the outputs volume).
    from renderer.cli.batch import read_batch

    text = config["data"]["night.jsonl"].replace("/outputs/", f"{tmp_path}/")
    (tmp_path / "night.jsonl").write_text(text)
    options = argv[4:]
    options[options.index("--model") + 1] = "sdxl-random"
    posters = read_batch(tmp_path / "night.jsonl", options)
    assert len(posters) == 4 and all(p.request.workers == 8 and p.request.gpus_per_worker == 1 for p in posters)
    assert {p.request.size for p in posters} >= {(8192, 8192), (8192, 4096), (4096, 8192)}
