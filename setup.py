"""Install relayq: the Python package lives in python/relayq (TVM's layout convention)."""
from setuptools import find_packages, setup

setup(
    name="relayq",
    version="0.1.0",
    description="Post-training quantization for Apache TVM (Relax): annotate, calibrate, realize, build",
    package_dir={"": "python"},
    packages=find_packages("python"),
    python_requires=">=3.9",
    install_requires=[
        # 0.27 is the Relax-only TVM this project targets.
        "apache-tvm==0.27.0.post1",
        # 0.1.15.x segfaults inside sch.tensorize (see shared docs, B1): pin the working FFI.
        "apache-tvm-ffi==0.1.14.post1",
        "numpy",
        "scipy",
        "onnx",
        # Normalizes what ONNX exporters write (Constant nodes, shape subgraphs, Identity/Dropout) before
        # TVM's importer: pure Python, 250 kB; needs colorama, ml-dtypes, packaging, sympy. Pinned: its
        # pass names and the node names it keeps are what relayq.frontend.onnx relies on.
        "onnxslim==0.1.98",
    ],
    extras_require={
        # What the test suite needs beyond the core: real data (digits) and progress of tuning.
        # torch trains the small CNNs of the end-to-end tests (2.13.0 is the CPU build on disk here;
        # never unpinned, which would pull several GB of CUDA packages).
        "test": ["pytest", "scikit-learn", "psutil", "cloudpickle", "torch==2.13.0", "onnxruntime", "pillow",
                 "tflite==2.18.0", "matplotlib>=3.5"],
        # onnxslim evaluates folded shape computations with ONNX Runtime: without it, ONNX exports whose
        # Reshape/Pad/Expand sizes are computed from shapes may not import.
        "onnx": ["onnxruntime"],
        # relayq.frontend.from_tflite: TVM's TFLite importer reads the flatbuffer through the generated
        # schema package (pure Python, 150 kB; needs flatbuffers and numpy). Pinned: the schema's
        # builtin-op codes and options are what the importer and relayq's op check read.
        "tflite": ["tflite==2.18.0"],
        # QuantizedModel.report's plots (relayq.analysis.report); 3.11.2 is the version the report was
        # checked with.
        "plots": ["matplotlib>=3.5"],
        # Peers and real-model data used by benchmarks and tutorials.
        "bench": ["onnxruntime", "pillow", "psutil", "cloudpickle"],
    },
    entry_points={"console_scripts": ["relayq=relayq.cli:main"]},
)
