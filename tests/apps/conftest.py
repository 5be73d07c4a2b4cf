"""Fixtures of the apps/runtime tests: its x86-64 build, a tiny OWQ model and its cpu export."""
from __future__ import annotations

import os
import shutil

import pytest

from .runtime_capi import ROOT, CApi, cmake_build, export_cli


@pytest.fixture(scope="session")
def runtime_build():
    """The x86-64 build of apps/runtime (library + CLI), under the git-ignored build/ folder."""
    missing = [t for t in ("cmake", os.environ.get("CXX", "g++")) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (needed to build apps/runtime)")
    return cmake_build(ROOT / "build" / "test-runtime-x86_64")


@pytest.fixture(scope="session")
def checkpoint(owq_checkpoint):
    return owq_checkpoint


@pytest.fixture(scope="session")
def cpu_dist(checkpoint, tmp_path_factory):
    return export_cli(checkpoint, "cpu", tmp_path_factory.mktemp("rt-dist") / "cpu")


@pytest.fixture(scope="session")
def capi(runtime_build):
    return CApi(runtime_build / "libedgequant_runtime.so")
