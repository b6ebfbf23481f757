import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _free_master_port(monkeypatch):
    """Entry-point runs in a subprocess inherit a free MASTER_PORT (a test that sets its own wins):
    the default 29500 is shared by every process of the machine, so two suites, or a suite and a
    run of the quick start, would otherwise collide at the rendezvous."""
    from multiproc import free_port
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
