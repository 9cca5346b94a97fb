"""The data loader's documented repairs and errors, windowing, and config parsing."""
import logging

import numpy as np
import pandas as pd
import pytest

from config import ConfigError, parse_config
from utils import DataError, Scaler, create_sequences, load_dataset, load_entity, window_to_point_scores


def write_split(folder, train, test=None, labels=None, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".csv.gz" if gz else ".csv"
    train.to_csv(folder / f"train{ext}", index=False)
    if test is not None:
        test.to_csv(folder / f"test{ext}", index=False)
    if labels is not None:
        labels.to_csv(folder / f"test_label{ext}", index=False)
    return folder


def frame(n, start=0, cols=("a", "b"), seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.random((n, len(cols))), columns=list(cols))
    df.insert(0, "timestamp", np.arange(start, start + n))
    return df


def test_shuffled_test_split_is_sorted_and_labels_follow(tmp_path, caplog):
    test = frame(50, start=100, seed=1)
    labels = pd.DataFrame({"timestamp": test.timestamp, "label": (test.a > 0.5).astype(int)})
    shuffled = test.sample(frac=1, random_state=0)
    write_split(tmp_path / "e", frame(40), shuffled, labels.sample(frac=1, random_state=3), gz=True)
    with caplog.at_level(logging.WARNING, logger="puad"):
        ent = load_entity(tmp_path / "e", min_rows=5)
    assert "not increasing" in caplog.text
    assert np.all(np.diff(ent.test_ts) > 0)
    np.testing.assert_allclose(ent.test[:, 0], test.a.to_numpy())
    np.testing.assert_array_equal(ent.labels, (test.a > 0.5).astype(int).to_numpy())


def test_nan_and_inf_are_filled_from_neighbours(tmp_path, caplog):
    train = frame(30)
    train.loc[0, "a"] = np.nan
    train.loc[5, "b"] = np.inf
    write_split(tmp_path / "e", train)
    with caplog.at_level(logging.WARNING, logger="puad"):
        ent = load_entity(tmp_path / "e")
    assert "2 NaN/inf values filled" in caplog.text
    assert np.isfinite(ent.train).all()
    assert ent.train[0, 0] == train.a[1] and ent.train[5, 1] == train.b[4]


def test_all_nan_column_is_an_error(tmp_path):
    train = frame(30)
    train["b"] = np.nan
    write_split(tmp_path / "e", train)
    with pytest.raises(DataError, match=r"train.csv: column\(s\) \['b'\] have no finite value"):
        load_entity(tmp_path / "e")


def test_constant_column_is_kept_and_scales_to_zero(tmp_path):
    train = frame(30)
    train["c"] = 7.0
    test = frame(30, start=30)
    test["c"] = [7.0] * 29 + [9.0]
    write_split(tmp_path / "e", train, test)
    ent = load_entity(tmp_path / "e")
    sc = Scaler("minmax").fit(ent.train)
    assert np.all(sc.transform(ent.train)[:, 2] == 0)
    assert sc.transform(ent.test)[-1, 2] == 2.0  # the change in test stays visible


def test_missing_column_is_an_error_extra_is_dropped(tmp_path, caplog):
    write_split(tmp_path / "m", frame(30, cols=("a", "b", "c")), frame(30, start=30))
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) \['c'\]"):
        load_entity(tmp_path / "m")
    write_split(tmp_path / "x", frame(30), frame(30, start=30, cols=("a", "b", "z")))
    with caplog.at_level(logging.WARNING, logger="puad"):
        ent = load_entity(tmp_path / "x")
    assert ent.test.shape == (30, 2) and "dropping column(s) ['z']" in caplog.text


def test_too_short_file_is_an_error(tmp_path):
    write_split(tmp_path / "e", frame(10))
    with pytest.raises(DataError, match=r"train.csv: 10 rows, fewer than one window of 20"):
        load_entity(tmp_path / "e", min_rows=20)


def test_missing_labels_and_bad_labels(tmp_path):
    test = frame(20, start=20)
    write_split(tmp_path / "e", frame(20), test, pd.DataFrame({"timestamp": test.timestamp[:-1], "label": 0}))
    with pytest.raises(DataError, match="no label for 1 test timestamp"):
        load_entity(tmp_path / "e")
    write_split(tmp_path / "f", frame(20), test, pd.DataFrame({"timestamp": test.timestamp, "label": 2}))
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        load_entity(tmp_path / "f")


def test_timestamp_is_optional_and_fault_column_is_read(tmp_path):
    test = frame(20).drop(columns="timestamp")
    labels = pd.DataFrame({"label": [0] * 10 + [1] * 10, "fault": [""] * 10 + ["cpu-stress"] * 10})
    write_split(tmp_path / "e", frame(20).drop(columns="timestamp"), test, labels)
    ent = load_entity(tmp_path / "e")
    assert ent.labels.sum() == 10 and list(ent.faults[9:11]) == ["", "cpu-stress"]


def test_folder_of_entities_natural_order_and_feature_check(tmp_path):
    for name in ("e-10", "e-2", "e-1"):
        write_split(tmp_path / "ds" / name, frame(30))
    assert [e.name for e in load_dataset(tmp_path / "ds")] == ["e-1", "e-2", "e-10"]
    assert [e.name for e in load_dataset(tmp_path / "ds", "e-10,e-1")] == ["e-10", "e-1"]
    with pytest.raises(DataError, match="no entity"):
        load_dataset(tmp_path / "ds", "nope")
    write_split(tmp_path / "ds" / "e-3", frame(30, cols=("a", "q")))
    with pytest.raises(DataError, match="features differ"):
        load_dataset(tmp_path / "ds")


def test_real_asd_entity_loads(asd):
    ents = load_dataset(asd, "omi-1,omi-12")
    assert ents[0].train.shape == (8640, 19) and ents[1].train.shape == (7291, 19)
    assert ents[0].test.shape == (4320, 19) and ents[0].labels.shape == (4320,)
    assert 0 < ents[0].labels.mean() < 0.2


def test_create_sequences_is_a_view():
    data = np.arange(60, dtype=np.float32).reshape(20, 3)
    w = create_sequences(data, 5, stride=2)
    assert w.shape == (8, 5, 3)
    assert np.shares_memory(w, data)
    np.testing.assert_array_equal(w[1], data[2:7])


def test_window_to_point_scores_alignment():
    ws = np.arange(4 * 3, dtype=float).reshape(4, 3)  # 4 windows of length 3 over 6 points
    np.testing.assert_array_equal(window_to_point_scores(ws, 3), [0, 1, 2, 5, 8, 11])


def test_config_precedence_and_errors(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text("epochs = 7\nlr = 0.5\nimport math\n")
    cfg = parse_config(["--preset=paper", f"--config={f}", "--lr=0.25", "--device=cpu", "--resume"])
    assert cfg.d_model == 512 and cfg.epochs == 7 and cfg.lr == 0.25 and cfg.device == "cpu" and cfg.resume
    assert parse_config([]).d_model == 64  # the cpu preset is the default
    with pytest.raises(ConfigError, match="unknown option --nope"):
        parse_config(["--nope=1"])
    with pytest.raises(ConfigError, match="expected int"):
        parse_config(["--epochs=many"])
    f.write_text("epochz = 3\n")
    with pytest.raises(ConfigError, match="unknown Config field 'epochz'"):
        parse_config([f"--config={f}"])


# --------------------------------------------------------------------------- interpretation.csv
def test_real_interpretation_labels_load_and_lie_on_labels():
    from conftest import DATASETS
    from utils import interpretation_segments
    for folder in ("ASD/omi-1", "SMD/machine-1-6"):
        if not (DATASETS / folder).is_dir():
            pytest.skip(f"{DATASETS / folder} is absent")
        ent = load_entity(DATASETS / folder)
        assert ent.interpretation, folder
        segs = interpretation_segments(ent)
        assert len(segs) == len(ent.interpretation)
        for (start, end, idx), (_, _, names) in zip(segs, ent.interpretation):
            assert 0 <= start <= end < len(ent.test) and ent.labels[start:end + 1].all()
            assert [ent.features[i] for i in idx] == names
    # indices follow the column order asked for, not the file's
    reordered = ent.features[::-1]
    for (_, _, idx), (_, _, names) in zip(interpretation_segments(ent, reordered), ent.interpretation):
        assert [reordered[i] for i in idx] == names


def _interp_split(tmp_path, text, gz=False):
    test = frame(20, start=100)
    labels = pd.DataFrame({"timestamp": test.timestamp, "label": 0})
    labels.loc[3:6, "label"] = 1
    folder = write_split(tmp_path / "e", frame(20), test, labels)
    path = folder / ("interpretation.csv.gz" if gz else "interpretation.csv")
    pd.DataFrame([line.split(",") for line in text.splitlines()[1:]],
                 columns=text.splitlines()[0].split(",")).to_csv(path, index=False)
    return folder


def test_synthetic_interpretation_loads(tmp_path):
    from utils import interpretation_segments
    ent = load_entity(_interp_split(tmp_path, "start,end,features\n3,6,b;a\n5,5,a", gz=True))
    assert ent.interpretation == [(3, 6, ["b", "a"]), (5, 5, ["a"])]
    assert interpretation_segments(ent) == [(3, 6, [1, 0]), (5, 5, [0])]
    assert interpretation_segments(ent, ["b", "a"]) == [(3, 6, [0, 1]), (5, 5, [1])]
    with pytest.raises(DataError, match="not among the given features"):
        interpretation_segments(ent, ["a"])
    assert load_entity(write_split(tmp_path / "none", frame(20), frame(20))).interpretation is None


@pytest.mark.parametrize("text,message", [
    ("start,features\n3,a", r"interpretation.csv: missing column\(s\) \['end'\]"),
    ("start,end,features\n6,3,a", r"interpretation.csv:2: start 6 > end 3"),
    ("start,end,features\n3,4,a\n15,20,a", r"interpretation.csv:3: rows 15..20 outside the 20 test rows"),
    ("start,end,features\n-1,4,a", r"outside the 20 test rows"),
    ("start,end,features\n3,4,a;cpu", r"interpretation.csv:2: unknown feature\(s\) \['cpu'\]"),
    ("start,end,features\n3,4,", r"interpretation.csv:2: no features"),
    ("start,end,features\n3.5,4,a", r"whole row numbers"),
])
def test_bad_interpretation_is_refused(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_entity(_interp_split(tmp_path, text))


def test_interpretation_on_unlabelled_rows_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="puad"):
        load_entity(_interp_split(tmp_path, "start,end,features\n2,4,a"))
    assert "cover rows labelled 0" in caplog.text


def test_split_train_val_holds_out_blocks_spread_over_the_series():
    from utils import split_train_val
    x = np.arange(1000, dtype=float)[:, None]
    (tr,), (tail,) = split_train_val(x, 0.1, 20)  # one block: the last 10 %
    assert len(tail) == 100 and tail[0, 0] == 900 and len(tr) == 900
    tr, held = split_train_val(x, 0.1, 20, blocks=4)  # the last 25 rows of each quarter
    assert [len(h) for h in held] == [25, 25, 25, 25] and [h[0, 0] for h in held] == [225, 475, 725, 975]
    assert sum(map(len, tr)) + sum(map(len, held)) == 1000
    assert np.array_equal(np.sort(np.concatenate(tr + held)[:, 0]), x[:, 0])  # a partition of the rows
    tr, held = split_train_val(x, 0.1, 20, blocks=50)  # every part keeps at least one window
    assert len(held) == 5 and min(map(len, held)) >= 20 and min(map(len, tr)) >= 20
    tr, held = split_train_val(x[:30], 0.1, 20)  # too short to hold anything out: validates on itself
    assert tr[0] is held[0]


def test_level_gauges_and_trailing_mean():
    """A level gauge moved, but less than 10 % of its magnitude (a pod's memory around 50 Mi);
    a constant, a load-like column and a gauge near 0 are none. trailing_mean is the mean of the
    rows before each row, history counted first."""
    from utils import level_gauges, trailing_mean
    t = np.arange(100.0)
    train = np.column_stack([50 + 0.01 * np.sin(t), np.full(100, 7.0), 10 + 5 * np.sin(t), 0.01 * np.sin(t),
                             -200 + np.cos(t)])
    assert level_gauges(train).tolist() == [True, False, False, False, True]
    x = np.arange(10.0)[:, None]
    got = trailing_mean(x, 3)
    assert got[0, 0] == 0.0 and got[1, 0] == 0.0 and got[2, 0] == 0.5  # the row itself, then what precedes
    np.testing.assert_allclose(got[3:, 0], [1, 2, 3, 4, 5, 6, 7])  # mean of the 3 before
    hist = np.array([[-3.0], [-2.0], [-1.0], [100.0]])[:-1]
    np.testing.assert_allclose(trailing_mean(x, 3, hist)[:3, 0], [-2.0, -1.0, 0.0])
    np.testing.assert_allclose(trailing_mean(x, 3, hist)[3:], got[3:])


def test_shared_features_finds_the_columns_entities_on_one_node_share():
    """A column with the same moving values in two entities over the timestamps every entity has
    is host-level (a node's CPU read by every pod on it); a column that only nearly matches, one
    constant in both, and entities whose timestamps are row numbers (no shared clock) are not;
    fewer than min_rows common timestamps match nothing."""
    from utils import Entity, shared_features
    rng = np.random.default_rng(0)
    ts = 1.7e9 + 60.0 * np.arange(200)
    node, own_a, own_b = rng.normal(size=(3, 200))
    a = Entity("a", ["node", "own", "flat"], np.column_stack([node, own_a, np.ones(200)]), ts)
    b = Entity("b", ["node", "own", "flat"], np.column_stack([node, own_a + 1e-3 * own_b, np.ones(200)]), ts)
    c = Entity("c", ["node", "own", "flat"], np.column_stack([own_b, own_b, np.ones(200)]), ts)
    assert shared_features([a, b, c]).tolist() == [True, False, False]
    assert shared_features([a, c]).tolist() == [False, False, False]
    late = Entity("b", b.features, b.train[150:], ts[150:])  # 50 common timestamps only
    assert shared_features([a, late]).tolist() == [False, False, False]
    assert shared_features([a, late], min_rows=40).tolist() == [True, False, False]
    rows = np.arange(200.0)
    assert not shared_features([Entity("a", a.features, a.train, rows), Entity("b", b.features, b.train, rows)]).any()


def test_shared_features_on_the_real_data_sets_are_their_node_columns():
    """The lab's three services run on one machine: its node_* columns are host-level, and
    nothing else is (the data set the repository carries). nezha_ob's Node* columns are shared
    by the pods that sit on one node (checkout and currency); ASD's servers share none."""
    from utils import shared_features
    from conftest import DATASETS, ROOT
    lab = load_dataset(ROOT / "Dataset" / "lab")
    assert [f for f, m in zip(lab[0].features, shared_features(lab)) if m] == [
        "node_cpu_user", "node_cpu_system", "node_cpu_idle", "node_load1", "node_memory_available"]
    if not (DATASETS / "nezha_ob").is_dir() or not (DATASETS / "ASD").is_dir():
        pytest.skip("../shared/datasets is absent")
    nezha = load_dataset(DATASETS / "nezha_ob")
    assert [f for f, m in zip(nezha[0].features, shared_features(nezha)) if m] == [
        "NodeCpuUsageRate(%)", "NodeMemoryUsageRate(%)", "NodeNetworkReceiveBytes"]
    assert not shared_features(load_dataset(DATASETS / "ASD")).any()


def test_split_bounds_are_split_train_val_s_cuts():
    from utils import split_bounds, split_train_val
    x = np.arange(1000.0)[:, None]
    for blocks in (1, 4):
        train, held = split_train_val(x, 0.1, 20, blocks)
        bounds = split_bounds(1000, 0.1, 20, blocks)
        assert [(p[0, 0], p[-1, 0] + 1) for p in held] == [(cut, hi) for _, cut, hi in bounds]
        assert [(p[0, 0], p[-1, 0] + 1) for p in train] == [(lo, cut) for lo, cut, _ in bounds]
    assert split_bounds(25, 0.1, 20) is None
