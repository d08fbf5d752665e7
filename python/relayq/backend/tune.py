"""MetaSchedule tuning for :func:`relayq.build` (``tune_trials=N, tuning_log=path``).

relayq's own kernels (fused int8 conv/dense, fp32 baseline kernels) are hand-scheduled and marked
``tirx.is_scheduled``, so an untuned build is already fast; tuning covers **everything else** that
TVM legalizes (residual-add requant chains, pools, quantize/dequantize, and any chain the lowering did
not match, e.g. other quantization schemes). The search space is TVM's default LLVM space plus
``MultiLevelTilingWithIntrin`` with relayq's own tensor intrinsic for the target (AVX2
``vpmaddubsw+vpmaddwd`` u8 x s8 for ``x86-avx2``, ``vpdpbusd`` for ``x86-vnni``), so any uint8 x int8
reduction left in the graph is auto-tensorized.

Records go to a JSON database in ``log_dir`` (``database_workload.json`` /
``database_tuning_record.json``). On the next build every task that already has a record is
**not tuned again**; the records are applied directly.

With ``rpc="host:port", device_key=...`` the candidates are measured on remote devices through TVM's
RPC tracker (meta-schedule's ``RPCRunner``; see :mod:`relayq.backend.rpc`): relayq's builder links each
candidate here (with the cross compiler for an ARM target) and the devices run it. A log directory keeps
the records of one kind of device: ``relayq_measured_on.json`` in it says which, and tuning into it for
another device (or locally after remotely) is refused.

Workarounds for TVM 0.27 (see the TVM field guide, B3/B4):

* MetaSchedule's default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (35-50 s, more
  than its 30 s timeout); relayq's builder compiles without that import. Tensorization happens in the
  tuning process, so workers never need the intrinsic registry.
* The cost model is ``"xgb"`` when ``xgboost`` is importable, else ``"random"``.

Example::

    lib = relayq.build(qmodel, target="x86-avx2", tune_trials=64, tuning_log="tuning/resnet18")
    lib = relayq.build(qmodel, target="x86-avx2", tune_trials=64, tuning_log="tuning/resnet18")  # reuses
    lib = relayq.build(qmodel, target="arm-dotprod", tune_trials=64, tuning_log="tuning/rk3588",
                       rpc="10.0.0.5:9190", device_key="rk3588")                                # on boards
"""
from __future__ import annotations

import json
import os
import tempfile

import tvm
from tvm import relax

from ..errors import ConfigError
from ..utils.log import get_logger
from ..utils.progress import Progress, stage

_log = get_logger("tune")

#: Per-candidate limits of the builder and runner (seconds).
BUILD_TIMEOUT = 60
RUN_TIMEOUT = 30
#: Below this many trials per task the search replays random traces instead of evolving a population.
EVOLUTIONARY_MIN_TRIALS = 32


def fusion_passes() -> tvm.transform.Pass:
    """Legalize + fuse: the form MetaSchedule extracts its tasks from (TVM's ``zero`` pipeline minus DB)."""
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])


def _make_fast_build():
    # A closure (pickled by value by cloudpickle), so the builder workers import only tvm.
    def fast_build(mod, target, _params):
        import tvm as _tvm
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return _tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return fast_build


def _intrinsic_for(target: tvm.target.Target):
    from . import intrin
    from .presets import preset_of

    return {"x86-avx2": intrin.AVX2_U8S8, "x86-vnni": intrin.VNNI_U8S8}.get(preset_of(target))


def search_space(target: tvm.target.Target):
    """TVM's default LLVM rules with relayq's tensor intrinsic (if the target has one) tried first."""
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.ScheduleRule.create("llvm"))
    postprocs = list(ms.Postproc.create("llvm"))
    name = _intrinsic_for(target)
    if name is not None:
        tiling = ms.schedule_rule.MultiLevelTilingWithIntrin(
            name, structure="SSRSRS", max_innermost_factor=64,
            reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"))
        at = next((i for i, r in enumerate(rules) if type(r).__name__ == "MultiLevelTiling"), len(rules))
        rules.insert(at, tiling)
        postprocs.append(ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs="llvm")


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _progress_callback(progress: Progress):
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            best = []
            for r in runner_results:
                if r.run_secs:
                    best.append(min(float(s) for s in r.run_secs) * 1e3)
            note = f"task {task_id}: best of batch {min(best):.3f} ms" if best else f"task {task_id}: no valid run"
            progress.step(len(measure_candidates), note)

    return _ProgressCallback()


def tunable_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """The MetaSchedule tasks of a (lowered) Relax module: fused TIR not scheduled by relayq."""
    from tvm.s_tir import meta_schedule as ms

    with target:
        fused = fusion_passes()(mod)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    return [t for t in tasks if not t.dispatched[0].attrs.get("tirx.is_scheduled", False)
            and not any(f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)
                        for _, f in t.dispatched[0].functions_items())]


def _has_record(db, task, target) -> bool:
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return False
    return db.query_tuning_record(mod, target, task.task_name) is not None


#: The file in a tuning log directory that names the device its records were measured on.
MEASURED_ON_FILE = "relayq_measured_on.json"


def _check_measured_on(log_dir: str, label: str) -> None:
    """Refuse to mix records of different devices in one log directory (the records name only the
    target, so a board's timings and this machine's would be indistinguishable)."""
    path = os.path.join(log_dir, MEASURED_ON_FILE)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f).get("measured_on")
        if before != label:
            raise ConfigError(f"the tuning log {log_dir} holds records measured on {before}, not {label}: "
                              "use another tuning_log for this device")
        return
    has_records = os.path.exists(os.path.join(log_dir, "database_tuning_record.json")) and \
        os.path.getsize(os.path.join(log_dir, "database_tuning_record.json")) > 0
    if has_records and label != "this machine":
        raise ConfigError(f"the tuning log {log_dir} holds records measured on this machine, not {label}: "
                          "use another tuning_log for this device")
    with open(path, "w") as f:
        json.dump({"measured_on": label}, f)


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, log_dir: str, *, seed: int = 0,
         verbose: bool = True, remote=None) -> dict:
    """Tune the tasks of ``mod`` that have no record in ``log_dir`` yet; returns a small report.

    ``remote``: a :class:`relayq.backend.rpc.RemoteDevices` to measure the candidates on (``target``
    should then come from its ``tuning_target``), or None for this machine.

    The report: ``{"tasks": all tasks, "tuned": tasks tuned now, "reused": tasks with records,
    "trials": trials run now, "log_dir": ..., "measured_on": "this machine" or "rpc key '...'"}``.
    """
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name != "llvm":
        raise ConfigError(f"tuning needs a device of the target to measure on; relayq tunes CPU (llvm) targets "
                          f"only, got {target.kind.name!r} (build without tune_trials)")
    if not target.attrs.get("num-cores"):
        raise ConfigError("the tuning target needs a 'num-cores' attribute (relayq presets set it)")
    label = remote.label if remote is not None else "this machine"
    os.makedirs(log_dir, exist_ok=True)
    _check_measured_on(log_dir, label)
    db = ms.database.JSONDatabase(work_dir=log_dir)
    tasks = tunable_tasks(mod, target)
    todo = [t for t in tasks if not _has_record(db, t, target)]
    report = {"tasks": len(tasks), "tuned": len(todo), "reused": len(tasks) - len(todo), "trials": 0,
              "log_dir": log_dir, "measured_on": label}
    if verbose:
        where = f", measured on {remote}" if remote is not None else ""
        _log.info("tuning %d of %d tasks (%d reuse records in %s), %d trials, cost model %s%s", len(todo), len(tasks),
                  len(tasks) - len(todo), log_dir, trials, _cost_model(), where)
    if not todo or trials <= 0:
        return report
    trials = max(int(trials), len(todo))
    # The evolutionary search samples a 512-schedule population per round: worth it for real budgets only.
    strategy = "evolutionary" if trials // len(todo) >= EVOLUTIONARY_MIN_TRIALS else "replay-trace"
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        todo, work_dir=log_dir, space=search_space(target), strategy=strategy,
        num_threads=int(target.attrs["num-cores"]), seed=seed)
    per_iter = max(1, min(16, trials // len(todo)))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if remote is None:
        cores = int(target.attrs["num-cores"])
        builder = ms.builder.LocalBuilder(f_build=_make_fast_build(), max_workers=cores, timeout_sec=BUILD_TIMEOUT)
        runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=evaluator)
    else:
        # The builders compile here, so they get this machine's cores whatever the target's num-cores says.
        builder = remote.builder(target, _make_fast_build(), os.cpu_count() or 1, BUILD_TIMEOUT)
        runner = remote.runner(evaluator, per_iter)
    with Progress("tuning trials", total=trials, enabled=verbose) as progress:
        callbacks = list(ms.MeasureCallback.create("default")) + [_progress_callback(progress)]
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=log_dir, max_trials_global=trials,
                      num_trials_per_iter=per_iter, builder=builder, runner=runner, database=db,
                      cost_model=_cost_model(), measure_callbacks=callbacks, task_scheduler="round-robin")
        report["trials"] = progress.count
    return report


def apply_records(mod: tvm.IRModule, target: tvm.target.Target, log_dir: str) -> tvm.IRModule:
    """Legalize + fuse ``mod`` and replace every task that has a record in ``log_dir`` by its best schedule."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=log_dir)
    with target, db:
        fused = fusion_passes()(mod)
        tuned = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    if target.kind.name == "llvm":
        from .schedule_rest import schedule_rest

        tuned = schedule_rest(target)(tuned)       # whatever had no record: not TVM's unscheduled loops
    return tuned


def tune_and_compile(mod: tvm.IRModule, target: tvm.target.Target, trials: int, log_dir: str | None = None,
                     *, verbose: bool = True, seed: int = 0, rpc=None, device_key: str | None = None):
    """Tune ``mod``'s tasks (those without records in ``log_dir``), then compile with the best records.

    ``log_dir`` ``None`` tunes into a temporary folder (nothing is kept). ``rpc="host:port"`` and
    ``device_key``: measure on the devices of that key behind that RPC tracker (a target without
    ``num-cores`` gets the devices' thread count). Returns the VM executable; the call's tuning report
    is in :data:`LAST_REPORT`.

    >>> # ex = tune_and_compile(lower_quantized(realized, "x86-avx2"), target, 64, "tuning/resnet18")
    """
    remote = None
    if rpc is not None or device_key is not None:
        from .rpc import RemoteDevices

        if rpc is None or device_key is None:
            raise ConfigError("measuring on remote devices needs both rpc='host:port' (the RPC tracker) and "
                              "device_key (the key its servers registered with)")
        if target.kind.name != "llvm":
            raise ConfigError(f"relayq tunes CPU (llvm) targets on remote devices, got {target.kind.name!r}")
        remote = RemoteDevices(rpc, device_key)
        target = remote.tuning_target(target)
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="relayq_tune_")
        log_dir = tmp.name
    try:
        report = tune(mod, target, trials, str(log_dir), seed=seed, verbose=verbose, remote=remote)
        with stage("compiling with the tuned schedules", enabled=verbose):
            tuned = apply_records(mod, target, str(log_dir))
            ex = tvm.compile(tuned, target=target)
    finally:
        if tmp is not None:
            tmp.cleanup()
    LAST_REPORT.clear()
    LAST_REPORT.update(report)
    return ex


#: The report of the latest :func:`tune_and_compile` call in this process (tasks, tuned, reused, trials).
LAST_REPORT: dict = {}
