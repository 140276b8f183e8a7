"""The security context of every container the operator writes (model server, router,
activator): no privilege escalation, a read-only root filesystem, not root, no capabilities."""

from __future__ import annotations


def locked_down() -> dict:
    """A fresh copy each call: the builders' manifests are theirs to change."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
