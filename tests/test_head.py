import json

import numpy as np
import pytest

from napari_denuc.errors import DenucError
from napari_denuc.head import LinearHead


def _data(n=600, d=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d)) * 3
    x = (centres[y] + rng.normal(size=(n, d))) * 5 + 100  # unstandardised on purpose
    return x.astype(np.float32), y


def test_fit_predict():
    x, y = _data()
    head = LinearHead(16, ["a", "b", "c"], encoder_id="enc")
    summary = head.fit(x, y, class_weight="balanced")
    assert summary["n_train"] == 600 and summary["train_accuracy"] > 0.95
    p = head.predict_proba(x)
    assert p.shape == (600, 3) and p.dtype == np.float32
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    assert (head.predict(x) == y).mean() > 0.95
    assert head.fit(x, y, optimizer="adam", epochs=5)["train_accuracy"] > 0.9


def test_missing_class_and_bad_inputs():
    x, y = _data()
    head = LinearHead(16, ["a", "b", "c", "d"])
    with pytest.raises(DenucError, match="no training examples for class.*d"):
        head.fit(x, y)
    with pytest.raises(DenucError, match="labels"):
        LinearHead(16, ["a", "b"]).fit(x, y)
    with pytest.raises(DenucError, match="shape"):
        LinearHead(8, ["a", "b", "c"]).fit(x, y)


def test_background_class():
    x, y = _data(k=4)
    head = LinearHead(16, ["a", "b", "c"], background=True)
    assert head.background_id == 3
    head.fit(x, y)
    p = head.predict_proba(x)
    assert p.shape == (600, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    bg = head.background_proba(x)
    assert bg.shape == (600,) and (bg[y == 3] > 0.5).mean() > 0.9
    with pytest.raises(DenucError, match="background"):
        LinearHead(16, ["a", "b", "c"], background=True).fit(x[y < 3], y[y < 3])


def test_save_load_round_trip_and_encoder_check(tmp_path):
    x, y = _data()
    head = LinearHead(16, ["a", "b", "c"], class_colors=[(1, 2, 3), (4, 5, 6), (7, 8, 9)], encoder_id="lite-v1+abc", mpp=0.5)
    head.fit(x, y)
    path = tmp_path / "heads" / "head.safetensors"
    head.save(path, metadata={"metrics": {"macro_f1": 0.7}, "dataset": "toy"})
    meta = json.loads((tmp_path / "heads" / "head.safetensors.json").read_text())
    assert meta["encoder_id"] == "lite-v1+abc" and meta["feature_dim"] == 16
    assert meta["class_names"] == ["a", "b", "c"] and meta["class_colors"][1] == [4, 5, 6]
    assert meta["metrics"] == {"macro_f1": 0.7} and meta["training"]["n_train"] == 600 and "created" in meta
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    class Enc:
        id, feature_dim = "lite-v1+abc", 16

    loaded = LinearHead.load(path, encoder=Enc())
    assert loaded.class_names == ("a", "b", "c") and loaded.class_colors[0] == (1, 2, 3)
    assert np.allclose(loaded.predict_proba(x), head.predict_proba(x), atol=1e-6)

    class Other:
        id, feature_dim = "uni2-h", 1536

    with pytest.raises(DenucError) as info:
        LinearHead.load(path, encoder=Other())
    assert "lite-v1+abc" in str(info.value) and "uni2-h" in str(info.value)
    with pytest.raises(DenucError, match="not found"):
        LinearHead.load(tmp_path / "nope.safetensors")


def test_fit_20k_by_256_learns_the_signal():
    """At the size a whole data set's features reach, the fit finds the 3 informative dims.

    (Its time is measured by training/bench_head.py, not asserted here.)
    """
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 24000)
    x = rng.normal(size=(24000, 256)).astype(np.float32)
    x[:, :3] += 3 * np.eye(3, dtype=np.float32)[y]
    head = LinearHead(256, ["a", "b", "c"])
    head.fit(x[:20000], y[:20000])
    assert (head.predict(x[20000:]) == y[20000:]).mean() > 0.9  # the Bayes rule (argmax of the 3 dims) gets 0.969
    w = np.abs(head.linear.weight.detach().numpy())
    assert w[:, :3].mean() > 5 * w[:, 3:].mean()  # the weight sits on the informative dims
