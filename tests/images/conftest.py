"""The images are built once per machine by scripts/build-images.sh; a
session that finds them missing builds them (minutes, the first time)."""

from __future__ import annotations

import subprocess

import pytest
from image_helpers import OPERATOR_IMAGE, ROOT, SERVICE_IMAGE, image_exists


@pytest.fixture(scope="session")
def images() -> dict:
    if not (image_exists(SERVICE_IMAGE) and image_exists(OPERATOR_IMAGE)):
        subprocess.run(["bash", str(ROOT / "scripts/build-images.sh")], check=True, timeout=3600)
    return {"service": SERVICE_IMAGE, "operator": OPERATOR_IMAGE}
