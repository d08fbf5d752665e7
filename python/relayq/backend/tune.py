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

Workarounds for TVM 0.27 (see the TVM field guide, B3/B4):

* MetaSchedule's default builder imports ``tvm.s_tir.tensor_intrin`` in every worker (35-50 s, more
  than its 30 s timeout); relayq's builder compiles without that import. Tensorization happens in the
  tuning process, so workers never need the intrinsic registry.
* The cost model is ``"xgb"`` when ``xgboost`` is importable, else ``"random"``.

Example::

    lib = relayq.build(qmodel, target="x86-avx2", tune_trials=64, tuning_log="tuning/resnet18")
    lib = relayq.build(qmodel, target="x86-avx2", tune_trials=64, tuning_log="tuning/resnet18")  # reuses
"""
from __future__ import annotations

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


def tune(mod: tvm.IRModule, target: tvm.target.Target, trials: int, log_dir: str, *, seed: int = 0,
         verbose: bool = True) -> dict:
    """Tune the tasks of ``mod`` that have no record in ``log_dir`` yet; returns a small report.

    The report: ``{"tasks": all tasks, "tuned": tasks tuned now, "reused": tasks with records,
    "trials": trials run now, "log_dir": ...}``.
    """
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name != "llvm":
        raise ConfigError(f"tuning needs a device of the target to measure on; relayq tunes CPU (llvm) targets "
                          f"only, got {target.kind.name!r} (build without tune_trials)")
    if not target.attrs.get("num-cores"):
        raise ConfigError("the tuning target needs a 'num-cores' attribute (relayq presets set it)")
    os.makedirs(log_dir, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=log_dir)
    tasks = tunable_tasks(mod, target)
    todo = [t for t in tasks if not _has_record(db, t, target)]
    report = {"tasks": len(tasks), "tuned": len(todo), "reused": len(tasks) - len(todo), "trials": 0,
              "log_dir": log_dir}
    if verbose:
        _log.info("tuning %d of %d tasks (%d reuse records in %s), %d trials, cost model %s", len(todo), len(tasks),
                  len(tasks) - len(todo), log_dir, trials, _cost_model())
    if not todo or trials <= 0:
        return report
    trials = max(int(trials), len(todo))
    # The evolutionary search samples a 512-schedule population per round: worth it for real budgets only.
    strategy = "evolutionary" if trials // len(todo) >= EVOLUTIONARY_MIN_TRIALS else "replay-trace"
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        todo, work_dir=log_dir, space=search_space(target), strategy=strategy,
        num_threads=int(target.attrs["num-cores"]), seed=seed)
    cores = int(target.attrs["num-cores"])
    builder = ms.builder.LocalBuilder(f_build=_make_fast_build(), max_workers=cores, timeout_sec=BUILD_TIMEOUT)
    runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))
    per_iter = max(1, min(16, trials // len(todo)))
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
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)


def tune_and_compile(mod: tvm.IRModule, target: tvm.target.Target, trials: int, log_dir: str | None = None,
                     *, verbose: bool = True, seed: int = 0):
    """Tune ``mod``'s tasks (those without records in ``log_dir``), then compile with the best records.

    ``log_dir`` ``None`` tunes into a temporary folder (nothing is kept). Returns the VM executable; the
    tuning report of the call is attached as ``executable.relayq_tuning`` when possible.

    >>> # ex = tune_and_compile(lower_quantized(realized, "x86-avx2"), target, 64, "tuning/resnet18")
    """
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="relayq_tune_")
        log_dir = tmp.name
    try:
        report = tune(mod, target, trials, str(log_dir), seed=seed, verbose=verbose)
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
