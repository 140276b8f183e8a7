"""Every session runs scripts/build-images.sh, so the images under test are
built from the code under test. The build is incremental (podman layers): the
first one on a machine takes minutes, one with only code changes about 1.5
minutes, one with nothing changed under a minute."""

from __future__ import annotations

import subprocess

import pytest
from image_helpers import OPERATOR_IMAGE, ROOT, SERVICE_IMAGE
from support.podman import image_exists


@pytest.fixture(scope="session")
def images() -> dict:
    subprocess.run(["bash", str(ROOT / "scripts/build-images.sh")], check=True, timeout=3600)
    assert image_exists(SERVICE_IMAGE) and image_exists(OPERATOR_IMAGE)
    return {"service": SERVICE_IMAGE, "operator": OPERATOR_IMAGE}
