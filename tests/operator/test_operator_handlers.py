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
