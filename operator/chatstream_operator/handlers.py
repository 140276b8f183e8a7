"""kopf handlers: thin glue between events and the pure builders.

A ChatStreamDeployment is reconciled the same way whatever woke the operator
(create, a spec change, an operator restart, a periodic check): build the
children from the spec and apply them. Status is computed from the owned
Deployment each time it changes.
"""

from __future__ import annotations

import datetime
import logging
import secrets

import kopf
from kubernetes.client.exceptions import ApiException

from . import kube, resources, status

CSD = (resources.GROUP, resources.VERSION, resources.PLURAL)
OWNED = {"app.kubernetes.io/managed-by": resources.MANAGER}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # Keep kopf's bookkeeping in annotations: status is ours, and the CRD's
    # structural schema would prune anything else written there.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=resources.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=resources.GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    # Kubernetes Events only for trouble; routine successes stay in the logs.
    settings.posting.level = logging.WARNING
    kube.login()


def _reconcile(body: dict, images: resources.Images) -> dict:
    kube.create_secret_once(resources.session_secret(body, secrets.token_urlsafe(32)))
    kube.apply(resources.service(body))
    return kube.apply(resources.deployment(body, images))


@kopf.on.resume(*CSD)
@kopf.on.create(*CSD)
@kopf.on.update(*CSD, field="spec")
@kopf.timer(*CSD, interval=120, idle=60)
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger, **_) -> None:
    """Ensure the Secret, Service and Deployment match the spec (idempotent)."""
    plain = dict(body)
    old = body.status.get("conditions") or []
    try:
        deployment = _reconcile(plain, memo.images)
    except ApiException as err:
        if err.status == 403 and "being terminated" in str(err.body):
            logger.info("namespace is being deleted; nothing to reconcile")
            return
        message = f"the API refused a child: {err.status} {err.reason}: {err.body}"
        patch.status.update(status.degraded(message, body.metadata.get("generation", 0), old, _now()))
        raise kopf.TemporaryError(message, delay=30) from err
    new = status.from_deployment(deployment)
    new["conditions"] = status.merge_conditions(new["conditions"], old, _now())
    patch.status.update(new)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def report(event: dict, body: kopf.Body, logger, **_) -> None:
    """Mirror an owned Deployment's progress into its owner's status."""
    if event["type"] == "DELETED":
        return  # the owner is going away, or the timer will recreate it
    owner = next(
        (r for r in body.metadata.get("ownerReferences", []) if r.get("kind") == resources.KIND and r.get("controller")),
        None,
    )
    if owner is None:
        return
    namespace = body.metadata["namespace"]
    current = kube.get_resource(namespace, owner["name"])
    if current is None or current["metadata"].get("uid") != owner["uid"]:
        return
    new = status.from_deployment(dict(body))
    new["conditions"] = status.merge_conditions(new["conditions"], (current.get("status") or {}).get("conditions"), _now())
    kube.patch_status(namespace, owner["name"], new)
