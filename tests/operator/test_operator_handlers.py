"""The few decisions handlers.py makes itself (the rest is status.py,
resources.py and workqueue.py, tested on their own, and the cluster tests)."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from chatstream_operator import handlers


def api_error(status: int, reason: str, body: dict) -> ApiException:
    err = ApiException(status=status, reason=reason)
    err.body = json.dumps(body, separators=(",", ":"))
    return err


def test_a_namespace_being_deleted_or_gone_ends_the_reconcile_quietly():
    terminating = api_error(403, "Forbidden", {"kind": "Status", "reason": "Forbidden", "message":
                            'secrets "chat-session" is forbidden: unable to create new content in namespace t-1 '
                            "because it is being terminated"})
    gone = api_error(404, "Not Found", {"kind": "Status", "message": 'namespaces "t-1" not found',
                                        "details": {"name": "t-1", "kind": "namespaces"}, "code": 404})
    assert handlers._namespace_going(terminating) and handlers._namespace_going(gone)


def test_other_refusals_are_reported_and_retried():
    quota = api_error(403, "Forbidden", {"kind": "Status", "message": "exceeded quota: services=0"})
    missing = api_error(404, "Not Found", {"kind": "Status", "details": {"name": "x", "kind": "deployments"}})
    assert not handlers._namespace_going(quota) and not handlers._namespace_going(missing)


def test_a_missing_api_keys_secret_is_reported():
    body = {"metadata": {"namespace": "team-a", "name": "chat"},
            "spec": {"auth": {"apiKeysSecretRef": {"name": "chat-keys"}}}}
    assert handlers.auth_problem(body, lambda ns, name, key: "k1\n") is None
    asked = []
    problem = handlers.auth_problem(body, lambda *args: asked.append(args))
    assert asked == [("team-a", "chat-keys", "keys")]
    assert "Secret team-a/chat-keys" in problem and "'keys'" in problem
    assert handlers.auth_problem({"metadata": body["metadata"], "spec": {}}, lambda *a: None) is None


def test_a_cached_model_gets_its_claim_and_fill_job_before_the_pods(monkeypatch, caplog):
    """The reconcile's order and what it tells status (model_cache.py): the
    claim and the Job exist before the Deployment whose pods mount the claim.
    The hub token is only named (a secretKeyRef): its value is in no manifest,
    no status and no log line of the operator."""
    import logging

    from chatstream_operator import kube, resources

    from builder_helpers import make_resource

    token = "hf_never_shown_0123456789"
    body = make_resource({"model": {"source": "hf:acme/tiny-chat", "cache": {"size": "5Gi"},
                                    "tokenSecretRef": {"name": "hub"}}})
    calls, sent, patched = [], [], []

    def apply(manifest):
        calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        sent.append(manifest)
        return {**manifest, "status": {"phase": "Pending"} if manifest["kind"] == "PersistentVolumeClaim" else {}}

    def ensure_job(manifest):
        calls.append(("job", manifest["metadata"]["name"]))
        sent.append(manifest)
        return {**manifest, "status": {}}

    monkeypatch.setattr(kube, "get_resource", lambda ns, name: body)
    monkeypatch.setattr(kube, "secret_value", lambda ns, name, key: token if name == "hub" else "session")
    monkeypatch.setattr(kube, "create", lambda manifest: sent.append(manifest))
    monkeypatch.setattr(kube, "apply", apply)
    monkeypatch.setattr(kube, "ensure_job", ensure_job)
    monkeypatch.setattr(kube, "list_pods", lambda ns, selector: calls.append(("pods", selector)) or [])
    monkeypatch.setattr(kube, "patch_status", lambda ns, name, st: patched.append(st))
    with caplog.at_level(logging.DEBUG):
        assert handlers.reconcile("team-a", "chat", resources.Images()) is None
    kinds = [c[1] if c[0] == "apply" else c[0] for c in calls]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("job") < kinds.index("Deployment")
    assert ("pods", f"batch.kubernetes.io/job-name={calls[kinds.index('job')][1]}") in calls
    [cond] = [c for c in patched[-1]["conditions"] if c["type"] == "ModelCached"]
    assert cond["reason"] == "Filling" and "chat-model-cache is Pending" in cond["message"]
    assert token not in repr(sent) + repr(patched) + caplog.text
