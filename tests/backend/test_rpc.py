"""Remote devices through TVM's RPC tracker, on loopback: a tracker and two servers started by the test.

Which server did what is read from each server's own log (``LoopbackCluster.loaded_modules``): every
library a server loads (a tuning candidate, ``candidate.so``, or a model, ``relayq_model.so``) is a
``load_module`` line there.
"""
import json
import shutil
import socket

import numpy as np
import pytest
from tvm import relax

import relayq
from relayq.backend import rpc as R
from relayq.backend import tune
from relayq.testing.rpc import LoopbackCluster, has_tracker_support

from helpers import tiny_cnn

KEY = "loopback"
CFG = relayq.QConfig(show_progress=False)

needs_tracker = pytest.mark.skipif(not has_tracker_support(), reason="TVM's RPC tracker needs tornado "
                                   "(pip install tornado)")


@pytest.fixture(scope="module")
def cluster(request):
    if not has_tracker_support():
        pytest.skip("TVM's RPC tracker needs tornado (pip install tornado)")
    c = LoopbackCluster(key=KEY, servers=2)
    request.addfinalizer(c.close)     # the processes go even when a test (or the start itself) fails
    return c.start()


@pytest.fixture(scope="module")
def tiny_int8():
    """A small quantized CNN (conv, BN, residual add, concat, pools, dense), built for this CPU."""
    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(2)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(3)]
    qmodel = relayq.quantize_model(mod, params, data, "naive", CFG)
    return relayq.build(qmodel), data


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]      # nothing listens there once the socket is closed


# ------------------------------------------------------------------ argument and connection errors

@pytest.mark.parametrize("bad", ["", "10.0.0.5:", ":9190", "host:port", "host:70000", "a:b:c", "my host:9190", 9190])
def test_malformed_rpc_string_is_a_config_error(bad):
    with pytest.raises(relayq.ConfigError, match="rpc"):
        R.parse_rpc(bad)


def test_rpc_forms_that_parse():
    assert R.parse_rpc(" 10.0.0.5:9190 ") == R.TrackerAddress("10.0.0.5", 9190)
    assert R.parse_rpc("boards.lan") == R.TrackerAddress("boards.lan", R.DEFAULT_TRACKER_PORT)
    assert R.parse_rpc("[::1]:9191") == R.TrackerAddress("::1", 9191)
    assert str(R.parse_rpc(("::1", 9191))) == "[::1]:9191"


def test_unreachable_tracker_names_the_address(tiny_int8):
    lib, data = tiny_int8
    port = _closed_port()
    with pytest.raises(relayq.TrackerUnreachableError, match=f"127.0.0.1:{port}"):
        relayq.remote(lib, rpc=f"127.0.0.1:{port}", device_key=KEY, inputs=data[0])


def test_build_passes_rpc_through_to_tuning():
    mod, params = tiny_cnn(0)
    port = _closed_port()
    with pytest.raises(relayq.TrackerUnreachableError, match=f"127.0.0.1:{port}"):   # not a BuildError
        relayq.build(mod, params=params, tune_trials=2, rpc=f"127.0.0.1:{port}", device_key=KEY)
    with pytest.raises(relayq.ConfigError, match="tune_trials"):
        relayq.build(mod, params=params, rpc=f"127.0.0.1:{port}", device_key=KEY)
    with pytest.raises(relayq.ConfigError, match="device_key"):
        relayq.build(mod, params=params, tune_trials=2, rpc=f"127.0.0.1:{port}")


def test_a_log_dir_keeps_one_device(tmp_path):
    tune._check_measured_on(str(tmp_path), "rpc key 'rk3588'")
    tune._check_measured_on(str(tmp_path), "rpc key 'rk3588'")             # same device: fine
    with pytest.raises(relayq.ConfigError, match="rk3588.*another tuning_log"):
        tune._check_measured_on(str(tmp_path), "this machine")


# ------------------------------------------------------------------ on the loopback cluster

@needs_tracker
def test_unknown_key_names_it_and_what_the_tracker_has(cluster, tiny_int8):
    lib, data = tiny_int8
    with pytest.raises(relayq.NoFreeDeviceError, match=r"'rk3588'.*'loopback': 2 server"):
        relayq.remote(lib, rpc=cluster.rpc, device_key="rk3588", inputs=data[0])


@needs_tracker
def test_remote_run_equals_local_bit_for_bit(cluster, tiny_int8, tmp_path):
    lib, data = tiny_int8
    cluster.wait_registered()
    before = cluster.loaded_modules()
    first = relayq.remote(lib, rpc=cluster.rpc, device_key=KEY, inputs=data[0], number=3, repeat=4)
    np.testing.assert_array_equal(first.outputs, lib(data[0]))
    assert first.outputs.dtype == lib(data[0]).dtype
    assert len(first.times_ms) == 4 and first.median_ms > 0 and first.median_ms == np.median(first.times_ms)
    # The exported file runs the same, inputs by name; the tracker hands out the other server.
    path = lib.export(str(tmp_path / "tiny_int8.so"))
    cluster.wait_registered()
    second = relayq.remote(path, rpc=cluster.rpc, device_key=KEY, inputs={"data": data[1]}, repeat=0)
    np.testing.assert_array_equal(second.outputs, lib(data[1]))
    assert second.median_ms is None and second.times_ms == ()
    loaded = [after[len(b):] for b, after in zip(before, cluster.loaded_modules())]
    assert sorted(sum(loaded, [])) == ["relayq_model.so", "tiny_int8.so"]
    assert all(len(x) == 1 for x in loaded), loaded          # one run on each server
    assert {first.server, second.server} == set(R.key_status(R.tracker_summary(cluster.rpc), KEY)["servers"])
    cluster.wait_registered(timeout=15)          # remote closed its sessions: both devices are free again


@needs_tracker
def test_no_free_device_within_the_timeout(cluster, tiny_int8):
    lib, data = tiny_int8
    cluster.wait_registered()
    held = [R.request_device(cluster.rpc, KEY, session_timeout=60) for _ in range(2)]   # both servers busy
    try:
        with pytest.raises(relayq.NoFreeDeviceError, match=r"'loopback'.*within 1 s.*2 server\(s\).*0 free"):
            relayq.remote(lib, rpc=cluster.rpc, device_key=KEY, inputs=data[0], timeout=1)
    finally:
        held.clear()                 # closing the sessions frees the servers
    cluster.wait_registered()


@needs_tracker
def test_bad_inputs_are_refused_before_a_device_is_taken(cluster, tiny_int8):
    lib, _ = tiny_int8
    with pytest.raises(relayq.DatasetError, match="'data'.*shape"):
        relayq.remote(lib, rpc=cluster.rpc, device_key=KEY, inputs=np.zeros((2, 3, 9, 9), "float32"))
    with pytest.raises(relayq.ConfigError, match="compiled model"):
        relayq.remote(object(), rpc=cluster.rpc, device_key=KEY)


# ------------------------------------------------------------------ tuning measured on the servers

def _one_conv(seed=0):
    rng = np.random.RandomState(seed)
    w = rng.randn(8, 4, 3, 3).astype("float32") * 0.3
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    wv = relax.Var("w", relax.TensorType(w.shape, "float32"))
    with bb.function("main", [x, wv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, wv, padding=(1, 1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    rng = np.random.RandomState(seed + 1)
    return bb.get(), {"w": w}, [rng.randn(1, 4, 8, 8).astype("float32") for _ in range(2)]


@needs_tracker
@pytest.mark.slow  # ~60-190 s on a shared 2-core machine: MetaSchedule's builder and runner workers start up
def test_tune_a_quantized_conv_on_both_servers(cluster, tmp_path):
    mod, params, data = _one_conv()
    qmodel = relayq.quantize_model(mod, params, data, "naive", CFG)
    log = tmp_path / "log"
    cluster.wait_registered()
    before = cluster.loaded_modules()
    # lower=False: the int8 conv is left to TVM, so it is a tuning task (relayq's own kernels are not).
    tuned = relayq.build(qmodel, target="x86-avx2", lower=False, tune_trials=4, tuning_log=str(log),
                         rpc=cluster.rpc, device_key=KEY)
    report = dict(tune.LAST_REPORT)
    assert report["measured_on"] == f"rpc key {KEY!r}" and report["trials"] >= 4
    lines = (log / "database_tuning_record.json").read_text().splitlines()
    assert any('"conv2d_nchw"' in line for line in lines)          # the conv's schedule is among the records
    records = [json.loads(line) for line in lines]
    run_secs = [r[1][1] for r in records]
    assert len(records) >= 4 and all(s and 0 < s[0] < 1 for s in run_secs), run_secs
    # Every record was measured on a server (the runner never runs locally), and both servers measured.
    loads = [[m for m in after[len(b):] if m == "candidate.so"] for b, after in zip(before, cluster.loaded_modules())]
    assert all(loads), f"a server measured nothing: {loads}"
    assert sum(map(len, loads)) == len(records)
    assert json.loads((log / tune.MEASURED_ON_FILE).read_text())["measured_on"] == f"rpc key {KEY!r}"
    # The tuned model computes the same integers as the untuned one, here and on a server.
    untuned = relayq.build(qmodel, target="x86-avx2", lower=False)
    np.testing.assert_array_equal(tuned(data[0]), untuned(data[0]))
    cluster.wait_registered()
    res = relayq.remote(tuned, rpc=cluster.rpc, device_key=KEY, inputs=data[0], repeat=1)
    np.testing.assert_array_equal(res.outputs, untuned(data[0]))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs the aarch64 cross compiler "
                    "(apt-get install g++-aarch64-linux-gnu)")
def test_candidates_for_an_arm_target_are_linked_for_aarch64(tmp_path):
    import tvm
    from tvm import te

    from relayq.backend.presets import AARCH64_CXX, target_from_preset

    a = te.placeholder((16,), "int8", name="a")
    b = te.compute((16,), lambda i: a[i] + 1, name="b")
    lib = tvm.tirx.build(te.create_prim_func([a, b]), target=target_from_preset("arm-dotprod"))
    path = R._make_export(AARCH64_CXX)(lib)
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183      # EM_AARCH64
