"""relayq.backend.tune: MetaSchedule tuning with relayq's builder, record reuse, bit-exact outputs."""
import time

import numpy as np
import pytest
from tvm import relax

from relayq.backend import lower as L
from relayq.backend import tune

from .kutil import AVX2, build_chain, conv_layer, cpu_flags, run_module

pytestmark = pytest.mark.skipif("avx2" not in cpu_flags(), reason="the x86-avx2 kernels need an AVX2 CPU")


def _tiny(rng):
    """conv (relayq kernel) -> max_pool2d (left to TVM: the one tuning task) -> conv (relayq kernel)."""
    layers = [conv_layer(rng, 4, 8, 3, 1, 1, relu=True), conv_layer(rng, 8, 8, 3, 1, 1, per_channel=True)]

    def pool(bb, y):
        return bb.emit(relax.op.nn.max_pool2d(y, (2, 2), (2, 2)))

    mod = build_chain((1, 4, 8, 8), layers, {0: pool})

    def reference(x):
        y = layers[0].reference(x)
        y = y.reshape(1, 8, 4, 2, 4, 2).max(axis=(3, 5))
        return layers[1].reference(y)

    return mod, reference


def test_search_space_carries_the_avx2_intrinsic():
    from relayq.backend import intrin

    assert tune._intrinsic_for(AVX2) == intrin.AVX2_U8S8
    rules = [type(r).__name__ for r in tune.search_space(AVX2).sch_rules]
    assert "MultiLevelTilingWithIntrin" in rules


@pytest.mark.slow  # ~65 s on 2 cores (MetaSchedule worker start-up dominates)
def test_tune_then_reuse_records_bit_exact(tmp_path, capsys):
    rng = np.random.default_rng(5)
    mod, reference = _tiny(rng)
    lowered = L.lower_quantized(mod, "x86-avx2")
    tasks = tune.tunable_tasks(lowered, AVX2)
    assert len(tasks) == 1 and "max_pool2d" in tasks[0].task_name      # relayq kernels are not tasks
    x = rng.integers(-127, 128, (1, 4, 8, 8)).astype(np.int8)
    untuned, _ = run_module(lowered, AVX2, x)
    np.testing.assert_array_equal(untuned, reference(x))

    log = str(tmp_path / "log")
    ex1 = tune.tune_and_compile(lowered, AVX2, 2, log)
    first = dict(tune.LAST_REPORT)
    assert first["tuned"] == 1 and first["trials"] >= 1
    assert "tuning trials" in capsys.readouterr().err                  # progress output
    assert (tmp_path / "log" / "database_tuning_record.json").stat().st_size > 0

    start = time.perf_counter()
    ex2 = tune.tune_and_compile(lowered, AVX2, 2, log)
    assert tune.LAST_REPORT["tuned"] == 0 and tune.LAST_REPORT["reused"] == 1 and tune.LAST_REPORT["trials"] == 0
    assert time.perf_counter() - start < 30
    for ex in (ex1, ex2):
        vm = relax.VirtualMachine(ex, __import__("tvm").cpu())
        out = vm["main"](__import__("tvm").runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(out, reference(x))


def test_tuning_a_cuda_target_is_refused():
    from relayq.backend.presets import target_from_preset
    from relayq.errors import ConfigError

    with pytest.raises(ConfigError, match="tun"):
        tune.tune(relax.BlockBuilder().get(), target_from_preset("cuda-dp4a"), 4, "/tmp/unused")
