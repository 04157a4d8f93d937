import os
import sys

import pytest
import torch

# benchmarks/zoo.py holds the models and data shared by tests and the MCT comparison
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
