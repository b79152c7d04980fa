"""The objects the Kubernetes backend asks for (e2a/kube/manifests.py), field by field."""

from __future__ import annotations

import json

import pytest

from e2a.kube import manifests
from e2a.kube.cluster import PodFailed, _mib, _millicores, _running_ip, ended
from lightkube.codecs import from_dict


def plan(**kw) -> manifests.PodPlan:
    base = dict(sandbox_id="sbx_abc123", instance="e2a", template="standard",
                user_id="usr_secret_id", image="e2a.local/e2a-standard:1-2", vcpu=2,
                cpu_fraction=0.5, memory_mib=512, disk_mib=2048, internet=True,
                envd_token="tok-123", env={"TZ": "UTC"}, nameservers=["10.0.0.53"],
                api_cidrs=["10.244.0.1/32"])
    return manifests.PodPlan(**{**base, **kw})


def test_the_pod_runs_gvisor_with_nothing_of_the_host_or_the_cluster():
    pod = manifests.pod(plan(), "ns")
    spec = pod["spec"]
    assert pod["metadata"]["name"] == "sbx-abc123"  # DNS-label safe
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert not (spec["hostNetwork"] or spec["hostPID"] or spec["hostIPC"])
    (c,) = spec["containers"]
    assert c["command"] == ["/.e2a/envd", "--listen", "0.0.0.0:984"]
    assert c["resources"]["limits"] == {"cpu": "1000m", "memory": "544Mi",
                                        "ephemeral-storage": "2048Mi"}
    # CPU shared (a tenth asked of the scheduler), memory asked for whole
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "544Mi",
                                          "ephemeral-storage": "2048Mi"}
    assert manifests.pod(plan(cpu_request_ratio=1.0), "ns")["spec"]["containers"][0][
        "resources"]["requests"]["cpu"] == "1000m"
    # memory overcommitted only when asked: the limit stays whole
    res = manifests.pod(plan(memory_request_ratio=0.25), "ns")["spec"]["containers"][0][
        "resources"]
    assert (res["requests"]["memory"], res["limits"]["memory"]) == ("136Mi", "544Mi")
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "SYS_ADMIN" not in c["securityContext"]["capabilities"]["add"]
    assert c["envFrom"] == [{"secretRef": {"name": "sbx-abc123"}}]
    assert spec["dnsConfig"] == {"nameservers": ["10.0.0.53"]}
    from_dict(pod)  # a valid Pod to the API's own models


def test_secrets_and_user_ids_stay_out_of_what_others_can_list():
    p = plan()
    pod, policy = manifests.pod(p, "ns"), manifests.network_policy(p, "ns")
    for obj in (pod, policy):
        text = json.dumps(obj)
        assert "tok-123" not in text and "usr_secret_id" not in text
    assert manifests.secret(p)["stringData"] == {"E2A_ENVD_TOKEN": "tok-123", "TZ": "UTC"}
    assert pod["metadata"]["labels"][manifests.OWNER] != "usr_secret_id"
    assert plan(user_id=None).labels[manifests.OWNER] == "pool"


def test_the_policy_lets_in_only_e2a_and_out_only_to_the_internet_and_dns():
    spec = manifests.network_policy(plan(), "ns")["spec"]
    assert spec["podSelector"]["matchLabels"] == {manifests.SANDBOX: "sbx-abc123",
                                                   manifests.INSTANCE: "e2a"}
    assert spec["ingress"] == [{"from": [{"ipBlock": {"cidr": "10.244.0.1/32"}}]}]
    internet, dns = spec["egress"]
    assert internet["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert "10.0.0.0/8" in internet["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in internet["to"][0]["ipBlock"]["except"]
    assert dns["to"] == [{"ipBlock": {"cidr": "10.0.0.53/32"}}]
    assert {p["port"] for p in dns["ports"]} == {53}
    offline = manifests.network_policy(plan(internet=False), "ns")["spec"]
    assert offline["egress"] == [dns]  # DNS only
    assert manifests.network_policy(plan(api_cidrs=[]), "ns")["spec"]["ingress"] == []
    from_dict(manifests.network_policy(plan(), "ns"))


def test_quantities_and_ends_as_the_cluster_writes_them():
    assert _millicores("1500m") == 1500 and _millicores("2") == 2000
    assert _mib("24576Mi") == 24576 and _mib("2Gi") == 2048 and _mib("1048576Ki") == 1024
    oom = from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                     "status": {"phase": "Failed", "containerStatuses": [{
                         "name": "sandbox", "image": "i", "imageID": "", "ready": False,
                         "restartCount": 0,
                         "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}})
    assert ended(oom).oom
    evicted = from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                         "status": {"phase": "Failed", "reason": "Evicted",
                                    "message": "low on memory", "containerStatuses": [{
                                        "name": "sandbox", "image": "i", "imageID": "",
                                        "ready": False, "restartCount": 0,
                                        "state": {"terminated": {
                                            "exitCode": 137,
                                            "reason": "ContainerStatusUnknown"}}}]}})
    end = ended(evicted)
    assert not end.oom and "Evicted" in end.detail and "low on memory" in end.detail
    # a read-only root's seeding copy, failed or waiting for an image that is not there: its
    # error, not the sandbox container's "PodInitializing"
    def initializing(init_state: dict) -> object:
        return from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                          "status": {"phase": "Pending", "initContainerStatuses": [{
                              "name": "seed-writable", "image": "i", "imageID": "",
                              "ready": False, "restartCount": 0, "state": init_state}],
                              "containerStatuses": [{
                                  "name": "sandbox", "image": "i", "imageID": "",
                                  "ready": False, "restartCount": 0, "state": {"waiting": {
                                      "reason": "PodInitializing"}}}]}})
    copy = ended(initializing({"terminated": {
        "exitCode": 1, "reason": "Error", "message": "cp: cannot stat '/var/x': No such file"}}))
    assert "seed-writable" in copy.detail and "cannot stat '/var/x'" in copy.detail
    with pytest.raises(PodFailed, match="ErrImageNeverPull"):
        _running_ip(initializing({"waiting": {"reason": "ErrImageNeverPull",
                                              "message": "not present"}}))
    assert ended(initializing({"running": {}})) is None
    running = from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                         "status": {"phase": "Running", "podIP": "10.244.0.5"}})
    assert ended(running) is None


def test_policy_lets_in_e2a_pods_of_its_own_namespace_only():
    peers = manifests.network_policy(plan(api_namespace="e2a-system"), "e2a-sandboxes")[
        "spec"]["ingress"][0]["from"]
    assert peers == [
        {"ipBlock": {"cidr": "10.244.0.1/32"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "e2a-system"}},
         "podSelector": {"matchLabels": {"e2a.dev/api": "e2a"}}}]
    # outside the cluster, only the address ranges
    assert manifests.network_policy(plan(), "ns")["spec"]["ingress"][0]["from"] == [
        {"ipBlock": {"cidr": "10.244.0.1/32"}}]


def test_with_agents_a_sandbox_reaches_e2a_at_its_egress_port_alone():
    # in the cluster: e2a's pods by their label, at the proxy's port; not the ingress ranges
    # (they may be wide enough to hold other sandboxes)
    inside = manifests.network_policy(plan(internet=False, egress_port=8334,
                                           egress_host="10.244.3.7",
                                           api_namespace="e2a-system"), "ns")["spec"]
    dns, proxy = inside["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert proxy["ports"] == [{"protocol": "TCP", "port": 8334}]
    assert proxy["to"] == [p for p in inside["ingress"][0]["from"] if "podSelector" in p]
    # outside it: the one address of the replica, not E2A_KUBE_API_CIDRS
    outside = manifests.network_policy(plan(internet=False, egress_port=8334,
                                            egress_host="10.244.0.1",
                                            api_cidrs=["10.0.0.0/8"]), "ns")["spec"]
    assert outside["egress"][-1]["to"] == [{"ipBlock": {"cidr": "10.244.0.1/32"}}]
    # agents off: no rule to e2a at all
    off = manifests.network_policy(plan(internet=False), "ns")["spec"]
    assert off["egress"] == [dns]
    from_dict(manifests.network_policy(plan(egress_port=8334, egress_host="10.244.0.1"), "ns"))


def test_agents_on_kubernetes_need_the_egress_host(tmp_path):
    """Without E2A_KUBE_EGRESS_HOST no pod could reach a proxy: refused at once, naming it."""
    import asyncio

    from e2a.api.errors import ApiError
    from e2a.api.schemas import CreateSandbox
    from e2a.api.tasks import agent_config
    from e2a.config import Settings
    req = CreateSandbox(template="standard", agent="gemini-cli", task="hello",
                        llm_key="AIza" + "x" * 35)
    with pytest.raises(ApiError) as e:
        asyncio.run(agent_config(req, Settings(data_dir=tmp_path, backend="kubernetes")))
    assert (e.value.status, e.value.code, e.value.field) == (501, "agent_not_available", "agent")
    assert "E2A_KUBE_EGRESS_HOST" in e.value.message
    on = Settings(data_dir=tmp_path, backend="kubernetes", kube_egress_host="10.244.0.1")
    assert asyncio.run(agent_config(req, on)).agent == "gemini-cli"


def test_a_workspace_pod_is_placed_with_its_mount_bound_as_the_home():
    assert "volumes" not in manifests.pod(plan(), "ns")["spec"]  # no workspace: nothing bound
    home = "/var/lib/e2a-node/mounts/sbx_abc123/home"
    pod = manifests.pod(plan(node="node-1", home=home), "ns")
    spec = pod["spec"]
    assert spec["nodeName"] == "node-1"  # where the agent mounted it, not the scheduler's pick
    assert spec["volumes"] == [{"name": "home",
                                "hostPath": {"path": home, "type": "Directory"}}]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "home", "mountPath": "/home/user"}]
    assert "initContainers" not in spec  # an existing workspace is not seeded again
    seeded = manifests.pod(plan(node="node-1", home=home, seed_home=True), "ns")["spec"]
    (init,) = seeded["initContainers"]
    assert init["image"] == "e2a.local/e2a-standard:1-2"  # the image's own /home/user, in gVisor
    assert init["command"][-2:] == ["/home/user/.", "/seed/"]
    assert init["securityContext"] == seeded["containers"][0]["securityContext"]
    assert init["resources"]["limits"] == {"cpu": "1000m", "memory": "544Mi"}
    from_dict(manifests.pod(plan(node="node-1", home=home, seed_home=True), "ns"))


def test_non_root_pods_meet_the_restricted_pod_security_standard():
    """E2A_KUBE_NON_ROOT (the default): what the standard's "restricted" profile checks, in
    every container (the seeding copy too); with it false envd is root in gVisor with Docker's
    capabilities (the plan's own default: manifests know nothing of settings)."""
    home = "/var/lib/e2a-node/mounts/sbx_abc123/home"
    spec = manifests.pod(plan(node="node-1", home=home, seed_home=True, non_root=True),
                         "ns")["spec"]
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"] == {
            "privileged": False, "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}
    # with root given back (E2A_KUBE_NON_ROOT=false), Docker's default capabilities
    rooted = manifests.pod(plan(), "ns")["spec"]["containers"][0]["securityContext"]
    assert "runAsNonRoot" not in rooted and "SETUID" in rooted["capabilities"]["add"]
    from_dict(manifests.pod(plan(non_root=True), "ns"))


def test_a_read_only_root_keeps_the_home_and_the_templates_paths_writable_as_the_image_had_them():
    """E2A_KUBE_READ_ONLY_ROOT: the image read-only in every container; one emptyDir, seeded
    with the image's own copies (owners and modes kept), mounted at each writable path."""
    spec = manifests.pod(plan(writable=("/tmp", "/var/tmp")), "ns")["spec"]
    (c,), (init,) = spec["containers"], spec["initContainers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert init["securityContext"] == c["securityContext"]
    assert init["command"] == ["/bin/cp", "-a", "--parents", "/tmp", "/var/tmp", "/home/user",
                               "/seed/"]
    assert init["volumeMounts"] == [{"name": "writable", "mountPath": "/seed"}]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"  # cp's error, if any
    assert spec["volumes"] == [{"name": "writable", "emptyDir": {"sizeLimit": "2048Mi"}}]
    assert {m["mountPath"]: m["subPath"] for m in c["volumeMounts"]} == {
        "/tmp": "tmp", "/var/tmp": "var/tmp", "/home/user": "home/user"}
    from_dict(manifests.pod(plan(writable=("/tmp",)), "ns"))
    # a workspace is the home: not copied over, its own seeding as before
    home = "/var/lib/e2a-node/mounts/sbx_abc123/home"
    spec = manifests.pod(plan(writable=("/tmp",), node="n", home=home, seed_home=True),
                         "ns")["spec"]
    assert [i["name"] for i in spec["initContainers"]] == ["seed-writable", "seed-home"]
    assert spec["initContainers"][0]["command"] == ["/bin/cp", "-a", "--parents", "/tmp",
                                                    "/seed/"]
    assert {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]} == {
        "/tmp": "writable", "/home/user": "home"}
    # with E2A_KUBE_READ_ONLY_ROOT=false, and for a template that does not allow it, the
    # root is writable
    writable = manifests.pod(plan(), "ns")["spec"]
    assert "readOnlyRootFilesystem" not in writable["containers"][0]["securityContext"]
    assert "volumes" not in writable and "initContainers" not in writable
