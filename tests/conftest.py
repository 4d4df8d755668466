import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed, per-test seed: failures reproduce, and tests don't share streams."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
