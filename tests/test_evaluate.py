"""test.py end to end on a checkpoint trained in this session."""
import json
import re
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


def test_ablation_first_row_is_test_py_and_an_override_renames_it(trained, tmp_path):
    """ablation.py's first row scores as test.py does; run with one option changed, its first row
    equals the row that changes that option, and is named for it rather than "default"."""
    import ablation

    ckpt_dir, data = trained
    common = [f"--ckpt={ckpt_dir}/puad.ckpt", f"--data={data}", "--entities=omi-1"]
    base = ablation.main([*common, f"--out_dir={tmp_path}/a"])
    first = next(iter(base))
    assert first.startswith("default") and list(base)[:len(ablation.VARIANTS)] == list(ablation.variants(ablation.Config()))
    assert base["oracle_alert_ceiling"]["fault_events"] >= base["oracle_alert_ceiling"]["caught"] >= 0
    assert base[first]["oracle_alert_ceiling"] == {k: base["oracle_alert_ceiling"][k] for k in ("caught", "fault_events")}
    assert all(base[name]["oracle_alert_ceiling"]["fault_events"] == base[first]["oracle_alert_ceiling"]["fault_events"]
               for name in ablation.variants(ablation.Config()))  # every variant's own ceiling, on the same faults
    assert sum(k.startswith("default, alarms held") for k in base) == len(ablation.ALARMS)
    _, m = run(tmp_path, ckpt_dir, data, "res", "--plots=False")
    for k in ("auc_pr", "f1", "threshold"):
        assert base[first]["entities"]["omi-1"][k] == pytest.approx(m["entities"]["omi-1"][k]), k
    floor = ablation.main([*common, "--score_floor=0.2", f"--out_dir={tmp_path}/b"])
    first_b = next(iter(floor))
    assert first_b == "this run's scorer (score_floor=0.2)"
    for k in ("auc_pr", "f1", "vus_pr"):
        assert floor[first_b]["mean"][k] == pytest.approx(base["floor 0.2"]["mean"][k]), k
    assert base["floor 0.2"]["mean"]["auc_pr"] != pytest.approx(base[first]["mean"]["auc_pr"])
    # the "two thresholds" variant keeps every point the default flags
    assert base["two thresholds: capped mean over its threshold or raw score over its own, the larger"]["entities"][
        "omi-1"]["recall"] >= base[first]["entities"]["omi-1"]["recall"]


def test_normal_load_ranks_the_feature_that_drifts_on_normal_points():
    """ablation.normal_load names what carries the score where nothing is labelled: a feature
    whose residual sits far off on the normal test points ranks first, and the labelled points do
    not count."""
    import ablation
    from puad import CalibrationData
    from scoring import Reconstruction, Scorer

    rng = np.random.default_rng(0)
    cal = Reconstruction(x=rng.normal(0.5, 0.05, (200, 3)), mu=np.full((200, 3), 0.5))
    x = rng.normal(0.5, 0.05, (100, 3))
    x[:, 2] += 1.0  # feature c drifts over the whole test split
    labels = np.zeros(100, int)
    labels[40:45] = 1
    x[40:45, 0] += 50.0  # feature a moves only on the labelled points
    test = Reconstruction(x=x, mu=np.full((100, 3), 0.5))
    scorer = Scorer(latent_weight=0.0).fit(cal)
    rows = ablation.normal_load(scorer, CalibrationData(cal, np.zeros(3, bool)), test, labels, ["a", "b", "c"])
    assert rows[0]["feature"] == "c" and len(rows) == 3
    assert rows[0]["test_normal"] > 10 * rows[0]["calibration"]
    assert rows[0]["test_normal"] > 100 * max(r["test_normal"] for r in rows[1:])


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


def test_extreme_test_value_scores_finite_and_flags_it(trained, omi1_copy, tmp_path):
    """One 1e18 in a test column used to end in 'scores contain NaN/inf': the scorer clips what the
    model sees, so the run completes, every score is finite and the extreme point is flagged."""
    ckpt_dir, _ = trained
    test = pd.read_csv(omi1_copy / "sorted" / "omi-1" / "test.csv.gz")
    test.loc[2000, "feature_3"] = 1e18
    out, m = run(tmp_path, ckpt_dir, variant(omi1_copy, "extreme", test=test), "x", "--plots=False")
    scores = pd.read_csv(out / "scores_omi-1.csv")
    assert np.isfinite(scores.score).all() and scores.prediction[2000] == 1
    assert np.isfinite(m["entities"]["omi-1"]["auc_pr"])


def test_segments_name_features_and_hitrate_is_reported(trained, tmp_path):
    """Every flagged run gets a row with its 3 top features; ASD's interpretation labels give
    HitRate@100/150 % beside the random ranking's floor."""
    ckpt_dir, data = trained
    out, m = run(tmp_path, ckpt_dir, data, "seg")
    segs = pd.read_csv(out / "segments_omi-1.csv")
    scores = pd.read_csv(out / "scores_omi-1.csv")
    assert len(segs) > 0 and segs.start.le(segs.end).all()
    assert all(scores.prediction[s:e + 1].all() for s, e in zip(segs.start, segs.end))
    assert int((segs.end - segs.start + 1).sum()) == int(scores.prediction.sum())
    assert all(len(t.split(";")) == 3 and all(f.startswith("feature_") for f in t.split(";")) for t in segs.top_features)
    assert (out / "contributions_omi-1.png").stat().st_size > 0
    e = m["entities"]["omi-1"]
    for k in ("hitrate_100", "hitrate_150", "hitrate_100_random", "hitrate_150_random"):
        assert 0 <= e[k] <= 1, k
    assert e["hitrate_150"] >= e["hitrate_100"] and e["smooth"] == 5


def test_transport_plot_shows_the_plan_before_and_after_adaptation(monkeypatch, tmp_path):
    """transport_plan.png: one panel without local prototypes; before/after panels for adapted
    entities, the plan before having no weight on the local prototypes, and the share of points
    the local prototypes reconstruct in the title."""
    figs = []
    monkeypatch.setattr(evaluate_script, "save_figure", lambda fig, path: figs.append(fig))
    rng = np.random.default_rng(0)
    after, before = rng.dirichlet(np.ones(12), 50), rng.dirichlet(np.ones(10), 50)
    labels = (np.arange(50) >= 40).astype(int)
    evaluate_script.plot_transport(tmp_path / "t.png", [before], [labels], 10)
    assert len(figs[-1].axes) == 1
    used = np.arange(50) < 20  # 20 of 40 normal points, none of the anomalous ones
    evaluate_script.plot_transport(tmp_path / "t.png", [after], [labels], 10, [before], [used])
    top, bottom = figs[-1].axes
    assert top.get_title().startswith("before") and "50% of normal, 0% of anomalous" in bottom.get_title()
    heights = np.array([p.get_height() for p in top.patches[:12]])  # the normal windows' bars
    np.testing.assert_allclose(heights[:10], before[labels == 0].mean(0))
    assert (heights[10:] == 0).all()


def test_latent_memory_is_the_train_rows_before_the_calibration_rows(trained, monkeypatch):
    """The latent term's memory holds theta0 of windows spread evenly over the train rows that
    come before the calibration rows (never the calibration rows themselves), at most 1,000 of
    them (puad.LATENT_MEMORY); test.py's scores use it, --latent_weight=0 scores without it.
    In fp32 (puad.SCORE_BF16): bf16 products differ in the last bits between batch sizes."""
    import torch

    import puad
    import scoring
    from config import parse_config
    from puad import LATENT_MEMORY, build_model, calibration_input, entity_state, latent_memory, read_checkpoint, run_config
    from utils import load_dataset, split_train_val
    monkeypatch.setattr(puad, "SCORE_BF16", False)
    src, data = trained
    ckpt = read_checkpoint(src / "puad.ckpt")
    model, _ = build_model(ckpt)
    cfg = run_config(parse_config([f"--ckpt={src / 'puad.ckpt'}", f"--data={data}"]), ckpt)
    ent = load_dataset(data, ["omi-1"])[0]
    _, scaler = entity_state(ckpt, cfg.ckpt, "omi-1")
    x = scaler.transform(ent.train)
    calib = calibration_input(model, ckpt, cfg, x, None, False)
    (before,), (tail,) = split_train_val(x, cfg.val_frac, cfg.seq_len)
    T = cfg.seq_len
    assert calib.memory.shape == (LATENT_MEMORY, cfg.d_theta) and calib.rows.theta0.shape == (len(tail), cfg.d_theta)
    ends = model.reconstruct(torch.as_tensor(np.stack([before[:T], before[-T:]]).astype(np.float32)))["theta0"].numpy()
    np.testing.assert_allclose(calib.memory[[0, -1]], ends, rtol=1e-5, atol=1e-6)  # first and last window before the tail
    whole = latent_memory(model, [before], cfg, size=10 ** 6)
    assert len(whole) == len(before) - T + 1  # every window before the tail, none of the tail's
    # a window of the tail is not in the memory: its distance to it is not 0
    assert scoring.Memory(whole).distance(calib.rows.theta0[T:T + 1], 1)[0] > 0


def test_preview_on_unlabelled_data_prints_alarm_events_per_day(tmp_path, capsys):
    """Recent normal data with no test_label.csv (issue 33's preview): test.py prints each entity's
    alarm events per day (alarms held --alarm_hold points), when each starts and ends, the metrics
    naming it, and warns when the threshold is extrapolated far beyond its calibration rows."""
    import train_safe
    rng = np.random.default_rng(0)
    t0, step, n = 1_800_000_000, 60, 600
    for name in ("e1", "e2"):
        t = np.arange(2 * n)
        x = np.stack([np.sin(t / (7 + j)) + 0.05 * rng.standard_normal(2 * n) for j in range(3)], 1)
        x[n + 300:n + 320, 1] += 8.0  # an unlabelled incident on b, rows 300-319 of the test split (4 train ranges)
        frame = pd.DataFrame(x, columns=["a", "b", "c"])
        frame.insert(0, "timestamp", t0 + step * t)
        (tmp_path / "data" / name).mkdir(parents=True)
        frame[:n].to_csv(tmp_path / "data" / name / "train.csv", index=False)
        frame[n:].to_csv(tmp_path / "data" / name / "test.csv", index=False)
    train_safe.main([f"--data={tmp_path / 'data'}", "--preset=test", f"--ckpt={tmp_path}/puad.ckpt",
                     f"--loss_csv={tmp_path}/loss.csv", "--seq_len=10", "--epochs=3", "--stage=global",
                     "--num_threads=1"])
    capsys.readouterr()
    m = evaluate_script.main([f"--ckpt={tmp_path}/puad.ckpt", f"--out_dir={tmp_path}/res", "--plots=False",
                              "--num_threads=1", "--alarm_hold=2"])
    out = capsys.readouterr().out
    for name in ("e1", "e2"):
        e = m["entities"][name]
        head = re.search(rf"^{name}: (\d+) alarm events? \((\d+\.\d) per day over 10\.0 h; alarms held 2 points, cleared after 5\)$",
                         out, re.M)
        assert head, out
        assert int(head.group(1)) == e["alarm_events"] and float(head.group(2)) == pytest.approx(e["alarms_per_day"], abs=0.05)
        assert f"WARNING: {name}: the threshold is fitted on {e['calibration_rows']} calibration rows" in out
        assert "SPOT extrapolates" in out
    # the incident is an alarm event of e1 and of e2, listed with its time and the metric it moved
    events = re.findall(r"^  (\S+ \S+Z) -> \S+ \S+Z  (.*)$", out, re.M)
    at = [(pd.Timestamp(start[:-1]).timestamp() - t0) / step - n for start, _ in events]
    caught = [names for (_, names), row in zip(events, at) if 300 <= row < 320]
    assert len(caught) == 2 and all("b" in names.split(", ") for names in caught), out
