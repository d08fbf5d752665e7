"""Fetch the TVM runtime libraries of another architecture, for cross-building relayq_run.

    python cmake/fetch_tvm_runtime.py build/aarch64-runtime        # -> build/aarch64-runtime/lib/

downloads the aarch64 wheels of the apache-tvm and apache-tvm-ffi versions installed here (with pip,
no dependencies) and extracts libtvm_runtime.so and libtvm_ffi.so into DIR/lib (one folder: the
runtime finds libtvm_ffi.so beside itself). The headers of the installed wheels serve every
architecture. Then:

    cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \\
          -DRELAYQ_TVM_RUNTIME_LIB=build/aarch64-runtime/lib/libtvm_runtime.so \\
          -DRELAYQ_TVM_FFI_LIB=build/aarch64-runtime/lib/libtvm_ffi.so
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

#: Wheel platform tags to accept, newest first (the 0.27 aarch64 wheels are manylinux_2_28).
PLATFORMS = {"aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]}
#: The libraries to extract: (distribution, path inside its wheel).
LIBS = [("apache-tvm", "tvm/lib/libtvm_runtime.so"), ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so")]


def installed_versions():
    from importlib.metadata import version

    return {dist: version(dist) for dist, _ in LIBS}


def fetch(out_dir: str, arch: str = "aarch64") -> str:
    """Extract the runtime libraries for ``arch`` into ``out_dir/lib``; returns that folder."""
    lib_dir = os.path.join(out_dir, "lib")
    if all(os.path.exists(os.path.join(lib_dir, os.path.basename(p))) for _, p in LIBS):
        return lib_dir
    os.makedirs(lib_dir, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory() as tmp:
        for dist, member in LIBS:
            pin = f"{dist}=={installed_versions()[dist]}"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", py, "-d", tmp, "-q", pin]
            for plat in PLATFORMS[arch]:
                cmd += ["--platform", plat]
            subprocess.run(cmd, check=True)
            wheel = glob.glob(os.path.join(tmp, dist.replace("-", "_") + "-*.whl"))[0]
            with zipfile.ZipFile(wheel) as z, open(os.path.join(lib_dir, os.path.basename(member)), "wb") as f:
                f.write(z.read(member))
    return lib_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="aarch64", choices=sorted(PLATFORMS))
    print(fetch(ap.parse_args().out_dir, ap.parse_args().arch))


if __name__ == "__main__":
    main()
