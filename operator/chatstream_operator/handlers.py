"""kopf handlers: thin glue between watch events and one reconcile function.

Level-triggered: an event about a ChatStreamDeployment, or about anything it
owns (Deployments, Services, session Secrets, the router's ConfigMap, pods), only names the resource
to look at again. `reconcile` then reads what is there, puts back what is
missing or drifted (server-side apply of the pure builders in resources.py),
and writes the status computed by status.compute: the one place status is
written. workqueue.WorkQueue keeps it to one run at a time per resource.

So a deleted Deployment or Service is back as soon as its DELETED event
arrives, an edited one as soon as its MODIFIED event does, and an operator
restart, which lists everything again, converges the same way.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
import secrets

import kopf
from kubernetes.client.exceptions import ApiException

from . import kube, model_cache, resources, router, scaler, status
from .workqueue import WorkQueue

CSD = (resources.GROUP, resources.VERSION, resources.PLURAL)
CHILDREN = [("apps", "v1", "deployments"), ("", "v1", "services"), ("", "v1", "secrets"), ("", "v1", "configmaps")]
CHILDREN += model_cache.CHILDREN  # the model cache's claim and fill Jobs
PODS = ("", "v1", "pods")
POD_LABELS = {"app.kubernetes.io/name": "chatstream"}
FILL_POD_LABELS = {"app.kubernetes.io/name": model_cache.FILL_NAME}  # the model cache's fill pods
RETRY_SECONDS = 15  # after the API refused something; any event retries sooner

log = logging.getLogger("chatstream_operator")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ref(namespace: str, name: str) -> dict:
    # kopf's JSON log formatter prints this as the record's "object".
    return {"k8s_ref": {"apiVersion": f"{resources.GROUP}/{resources.VERSION}", "kind": resources.KIND,
                        "namespace": namespace, "name": name}}


def _session_secrets(resource: dict) -> None:
    """Create whichever session Secret is missing, with the value the other
    one holds (see resources.session_secrets_to_create and docs/operator.md)."""
    meta = resource["metadata"]
    ns, name = meta["namespace"], meta["name"]
    value = kube.secret_value(ns, resources.session_secret_name(name), resources.SESSION_SECRET_KEY)
    copy = kube.secret_value(ns, resources.session_secret_copy_name(name), resources.SESSION_SECRET_KEY)
    for manifest in resources.session_secrets_to_create(resource, value, copy, secrets.token_urlsafe(32)):
        kube.create(manifest)


def auth_problem(resource: dict, secret_value=None) -> str | None:
    """Why the pods cannot mount spec.auth.apiKeysSecretRef, or None. A pod
    whose Secret volume is missing waits in ContainerCreating, with nothing
    in its status the operator could report: so the Secret itself is looked
    at (and looked at again every RETRY_SECONDS until it exists)."""
    ref = resources.api_keys_ref(resource["spec"])
    ns = resource["metadata"]["namespace"]
    if ref is None or (secret_value or kube.secret_value)(ns, ref["name"], ref["key"]) is not None:
        return None
    return (f"spec.auth.apiKeysSecretRef: Secret {ns}/{ref['name']} does not exist or has no key "
            f"{ref['key']!r}; the pods wait for it")


def _model_cache(resource: dict, manifest: dict) -> model_cache.CacheState | None:
    """The model cache's claim (when the operator makes it) and fill Job,
    and what status says about them (model_cache.py)."""
    claim = model_cache.claim(resource, manifest)
    claim = kube.apply(claim) if claim else None
    job = model_cache.fill_job(resource, manifest)
    if job is None:
        return None
    job = kube.ensure_job(job)
    pods = kube.list_pods(resource["metadata"]["namespace"], model_cache.fill_pod_selector(resource))
    return model_cache.state(resource, job, claim, status.pod_failure(pods))


def _namespace_going(err: ApiException) -> bool:
    """Creating in a namespace being deleted is refused (403), and in one just
    gone too (404 on the namespace itself): the resource goes with it."""
    body = str(err.body)
    return (err.status == 403 and "being terminated" in body) or (err.status == 404 and '"kind":"namespaces"' in body)


def reconcile(namespace: str, name: str, images: resources.Images) -> float | None:
    """Make the children match the spec and write the status; returns the
    delay after which to try again, or None."""
    resource = kube.get_resource(namespace, name)
    if resource is None or resource["metadata"].get("deletionTimestamp"):
        return None  # gone or going: the garbage collector removes the children
    error, retry, deployment, router_deployment, cache = None, None, None, None, None
    try:
        _session_secrets(resource)
        kube.apply(resources.service(resource))
        manifest = resources.deployment(resource, images)
        cache = _model_cache(resource, manifest)  # the claim before the pods that mount it
        deployment = kube.apply(manifest)
        # The session-affine router (router.py): config, headless pods
        # Service, router Service, router Deployment (at 0 when disabled).
        *router_children, router_manifest = router.children(resource, images.router, images.activator)
        for manifest in router_children:
            kube.apply(manifest)
        router_deployment = kube.apply(router_manifest)
    except ApiException as err:
        if _namespace_going(err):
            log.info("namespace is being deleted; nothing to reconcile", extra=_ref(namespace, name))
            return None
        error, retry = f"the API refused a child: {err.status} {err.reason}: {err.body}", RETRY_SECONDS
        log.warning(error, extra=_ref(namespace, name))
    if error is None and (error := auth_problem(resource)):
        retry = RETRY_SECONDS
    pods = kube.list_pods(namespace, resources.selector(name))
    new = status.compute(resource, deployment, pods, error, _now(), router_deployment, cache)
    if status.changed(resource, new):
        kube.patch_status(namespace, name, new)
    log.info("reconciled", extra=_ref(namespace, name))
    return retry


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.watching.server_timeout = 300
    # Kubernetes Events only for trouble; routine successes stay in the logs.
    settings.posting.level = logging.WARNING
    # Ask the API server for our children and pods only, instead of every
    # Deployment, Service, Secret and pod of the cluster.
    managed = ",".join(f"{k}={v}" for k, v in resources.MANAGED_BY.items())
    for group, version, plural in CHILDREN:
        settings.watching.label_selectors[group, version, plural] = managed
    # The model pods and the model cache's fill pods.
    names = f"{POD_LABELS['app.kubernetes.io/name']},{FILL_POD_LABELS['app.kubernetes.io/name']}"
    settings.watching.label_selectors[PODS] = f"app.kubernetes.io/name in ({names})"
    kube.login()
    images = memo.images

    async def work(key: tuple[str, str]) -> float | None:
        try:
            return await asyncio.to_thread(reconcile, *key, images)
        except Exception:  # an API hiccup reading, not a verdict: try again
            log.exception("reconcile failed", extra=_ref(*key))
            return RETRY_SECONDS

    memo.queue = WorkQueue(work)
    # The autoscaler (scaler.py): a loop per resource with spec.autoscaling.
    memo.signal = scaler.SignalReader()
    memo.scalers = scaler.Scalers(lambda body: scaler.Scaler(body, memo.signal, scale))


async def scale(body: dict, decision, autoscaling: dict) -> bool:
    """Write an autoscaling decision: spec.replicas (the reconcile carries
    it to the Deployment), status.autoscaling, and an Event. False, and
    nothing written, when spec.autoscaling changed since the body the
    decision rested on (the scaler decides again on the new one)."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if not await asyncio.to_thread(kube.patch_replicas, ns, name, decision.replicas, body["spec"]["autoscaling"]):
        return False
    await asyncio.to_thread(kube.patch_status, ns, name, {"autoscaling": autoscaling})
    kopf.event(body, type="Normal", reason=decision.reason, message=decision.message)
    return True


@kopf.on.cleanup()
async def stop_scalers(memo: kopf.Memo, **_) -> None:
    await memo.scalers.close()
    await memo.signal.close()


@kopf.on.event(*CSD)
async def resource_event(event: dict, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    if event["type"] == "DELETED":
        memo.queue.forget(key)
        memo.scalers.stop(key)
    else:
        memo.queue.trigger(key)
        memo.scalers.update(key, copy.deepcopy(dict(body)))


async def _child_event(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    owner = resources.owner_of(dict(body)) or model_cache.owner_of(dict(body))
    if owner is not None:
        memo.queue.trigger((body.metadata.namespace, owner))


for _group, _version, _plural in CHILDREN:
    kopf.on.event(_group, _version, _plural, labels=resources.MANAGED_BY, id=f"child-{_plural}")(_child_event)
kopf.on.event(*PODS, labels=POD_LABELS, id="pods")(_child_event)
kopf.on.event(*PODS, labels=FILL_POD_LABELS, id="fill-pods")(_child_event)
