"""The package as a user installs it: pyproject.toml (one version, the extras the README promises, a core that
does not force numpy 2) and the mxnet extra's promise that MXNet imports beside relayq."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import relayq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")


@pytest.fixture(scope="module")
def project():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


def _names(requirements):
    return {re.split(r"[=<>!~; \[]", r, maxsplit=1)[0].lower(): r for r in requirements}


def test_version_is_written_once(project):
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "relayq.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", relayq.__version__)
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))


def test_console_script_and_package_dir(project):
    assert project["project"]["scripts"] == {"relayq": "relayq.cli:main"}
    assert project["tool"]["setuptools"]["packages"]["find"]["where"] == ["python"]


def test_extras(project):
    extras = {k: _names(v) for k, v in project["project"]["optional-dependencies"].items()}
    assert {"test", "bench", "mxnet", "plots", "onnx", "tflite"} <= set(extras)
    assert {"onnxruntime", "openvino", "nncf", "torch", "pillow", "psutil", "cloudpickle"} <= set(extras["bench"])
    assert extras["bench"]["torch"] == extras["test"]["torch"] == "torch==2.13.0"     # never the CUDA build
    assert extras["mxnet"] == {"mxnet": "mxnet==1.9.1", "numpy": "numpy==1.23.5"}
    assert "matplotlib" in extras["plots"]


def test_core_dependencies_allow_numpy_1(project):
    core = _names(project["project"]["dependencies"])
    assert core["tqdm"].startswith("tqdm==")                                           # pinned, maintained bars
    for name in ("torch", "onnxruntime", "openvino", "mxnet", "matplotlib"):
        assert name not in core, f"{name} belongs in an extra"
    # mxnet 1.9.1 needs numpy < 2: the core must not ask for numpy >= 2.
    assert not re.search(r">=\s*2", core["numpy"]), core["numpy"]


@pytest.mark.skipif(importlib.util.find_spec("mxnet") is None,
                    reason="mxnet is not installed (pip install -e \".[mxnet]\")")
def test_mxnet_imports_beside_relayq():
    code = ("import relayq, relayq.frontend, numpy, mxnet as mx; "
            "y = (mx.nd.array([[1, 2], [3, 4]]) * 2).asnumpy(); "
            "print(mx.__version__, numpy.__version__, y.tolist())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    version, numpy_version, values = res.stdout.split(" ", 2)
    assert version == "1.9.1" and numpy_version.startswith("1.")
    assert values.strip() == "[[2.0, 4.0], [6.0, 8.0]]"
