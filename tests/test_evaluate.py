"""test.py end to end on a checkpoint trained in this session."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import test as evaluate_script


def run(tmp, ckpt_dir, data, name, *extra):
    out = tmp / name
    evaluate_script.main([f"--ckpt={ckpt_dir}/puad.ckpt", f"--data={data}", "--entity=omi-1",
                          f"--out_dir={out}", "--plots=True", *extra])
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def omi1_copy(trained, tmp_path_factory):
    """A scratch copy of omi-1 that tests may shuffle or relabel (never committed)."""
    _, data = trained
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(data / "omi-1", root / "sorted" / "omi-1")
    return root


def variant(root, name, test=None, labels=None, keep_labels=True):
    """root/name/omi-1: omi-1's train split with the given test/label frames (default: the originals)."""
    src, dst = root / "sorted" / "omi-1", root / name / "omi-1"
    dst.mkdir(parents=True)
    shutil.copy(src / "train.csv.gz", dst / "train.csv.gz")
    (pd.read_csv(src / "test.csv.gz") if test is None else test).to_csv(dst / "test.csv", index=False)
    if keep_labels:
        (pd.read_csv(src / "test_label.csv.gz") if labels is None else labels).to_csv(dst / "test_label.csv", index=False)
    return root / name


def test_writes_every_file_and_honest_metrics_first(trained, tmp_path):
    ckpt_dir, data = trained
    out, m = run(tmp_path, ckpt_dir, data, "res")
    for f in ("metrics.json", "scores_omi-1.csv", "evaluation_metrics.png", "anomaly_scores_omi-1.png",
              "transport_plan.png"):
        assert (out / f).stat().st_size > 0, f
    e = m["entities"]["omi-1"]
    for k in ("precision", "recall", "f1", "f1_pa", "auc_roc", "auc_pr", "best_f1_oracle",
              "best_f1_pa_oracle", "vus_pr", "threshold"):
        assert k in e and k in m["mean"], k
    assert 0.3 < e["auc_roc"] <= 1 and e["threshold_method"] == "spot"
    scores = pd.read_csv(out / "scores_omi-1.csv")
    assert list(scores.columns) == ["timestamp", "score", "threshold", "prediction", "label"]
    assert len(scores) == 4320 and np.isfinite(scores.score).all()
    assert (scores.prediction == (scores.score > scores.threshold)).all()


def test_shuffled_test_split_gives_the_same_metrics(trained, omi1_copy, tmp_path):
    ckpt_dir, _ = trained
    src = omi1_copy / "sorted" / "omi-1"
    shuffled = variant(omi1_copy, "shuffled", pd.read_csv(src / "test.csv.gz").sample(frac=1, random_state=0),
                       pd.read_csv(src / "test_label.csv.gz").sample(frac=1, random_state=1))
    _, a = run(tmp_path, ckpt_dir, omi1_copy / "sorted", "a")
    _, b = run(tmp_path, ckpt_dir, shuffled, "b")
    for k in ("auc_roc", "auc_pr", "f1", "f1_pa", "threshold", "best_f1_oracle"):
        assert a["entities"]["omi-1"][k] == pytest.approx(b["entities"]["omi-1"][k], rel=1e-6), k


def test_labels_do_not_reach_the_threshold(trained, omi1_copy, tmp_path):
    """Inverted labels would move any label-dependent choice; threshold and predictions must not move."""
    ckpt_dir, _ = trained
    lab = pd.read_csv(omi1_copy / "sorted" / "omi-1" / "test_label.csv.gz")
    lab["label"] = 1 - lab["label"]
    inverted = variant(omi1_copy, "inverted", labels=lab)
    out_a, a = run(tmp_path, ckpt_dir, omi1_copy / "sorted", "a", "--plots=False")
    out_b, b = run(tmp_path, ckpt_dir, inverted, "b", "--plots=False")
    assert a["entities"]["omi-1"]["threshold"] == b["entities"]["omi-1"]["threshold"]
    pa, pb = pd.read_csv(out_a / "scores_omi-1.csv"), pd.read_csv(out_b / "scores_omi-1.csv")
    assert (pa.prediction == pb.prediction).all() and (pa.score == pb.score).all()
    assert a["entities"]["omi-1"]["auc_roc"] == pytest.approx(1 - b["entities"]["omi-1"]["auc_roc"], abs=1e-9)


def test_unlabelled_test_set_still_scores(trained, omi1_copy, tmp_path):
    ckpt_dir, _ = trained
    out, m = run(tmp_path, ckpt_dir, variant(omi1_copy, "nolabels", keep_labels=False), "c")
    assert "metrics need labels" in m["note"]
    scores = pd.read_csv(out / "scores_omi-1.csv")
    assert len(scores) == 4320 and set(scores.prediction) <= {0, 1} and (scores.label == -1).all()
