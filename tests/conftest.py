"""Shared fixtures: a small CNN trained on scikit-learn's digits in a few seconds, and its data."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import digits_split, train_digits_cnn  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """(x_train, y_train, x_test, y_test) of the 8x8 digits, float32 NCHW in [0, 1]."""
    pytest.importorskip("sklearn", reason="scikit-learn provides the digits data")
    return digits_split()


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """A trained torch CNN (conv+BN, residual add, concat, max/avg pool, dense) and its FP32 accuracy."""
    pytest.importorskip("torch", reason="the digits CNN is trained with torch")
    return train_digits_cnn(*digits)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests on real models (opt in with -m slow)")
    np.random.seed(0)
