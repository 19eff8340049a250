"""Neighbourhood context: each nucleus reads the mean features of the nuclei around it."""

import numpy as np
import pytest

from napari_denuc.context import with_context
from napari_denuc.errors import DenucError
from napari_denuc.head import LinearHead
from napari_denuc.retrain import retrain_head
from napari_denuc.results import Detections
from napari_denuc.widget.edits import Candidates


def test_neighbours_within_the_radius_in_micrometres():
    f = np.arange(8, dtype=np.float32).reshape(4, 2)
    xy = np.array([[0, 0], [10, 0], [100, 0], [0, 15]], float)  # pixels at 0.5 um: 5 um, 50 um, 7.5 um from the first
    out = with_context(f, xy, mpp=0.5, radius_um=8.0)
    assert out.shape == (4, 5)
    np.testing.assert_allclose(out[:, :2], f)
    np.testing.assert_allclose(out[0, 2:4], (f[1] + f[3]) / 2)  # both within 8 um
    np.testing.assert_allclose(out[1, 2:4], f[0])  # the fourth is 9 um away
    np.testing.assert_allclose(out[2, 2:4], f[2])  # alone: its own features
    np.testing.assert_allclose(out[:, 4], np.log1p([2, 1, 0, 1]))
    # the same tissue at another resolution: same context
    np.testing.assert_allclose(with_context(f, xy * 2, mpp=0.25, radius_um=8.0), out, rtol=1e-6)
    assert with_context(np.zeros((0, 2), np.float32), np.zeros((0, 2)), 0.5, 8.0).shape == (0, 5)


def _tissue(rng, n_clusters=30):
    """Two kinds of nuclei that look alike on their own (feature 0 is noise around the class
    mean) but sit in same-kind clusters, as lymphocytes in an infiltrate and tumour nuclei in a
    nest: the neighbours' mean tells them apart far better than the nucleus alone."""
    xy, y = [], []
    for c in range(n_clusters):
        centre = rng.uniform(0, 4000, 2)
        xy.append(centre + rng.normal(scale=15, size=(12, 2)))
        y.append(np.full(12, c % 2))
    xy, y = np.concatenate(xy), np.concatenate(y)
    f = (y[:, None] * 0.6 + rng.normal(size=(len(y), 4))).astype(np.float32)
    return f, xy, y


def test_a_context_head_learns_from_neighbours_saves_and_retrains(tmp_path):
    rng = np.random.default_rng(0)
    f, xy, y = _tissue(rng)
    ft, xyt, yt = _tissue(np.random.default_rng(1))
    plain = LinearHead(4, ["a", "b"])
    plain.fit(f, y)
    head = LinearHead(4, ["a", "b"], context_um=20.0)
    assert head.input_dim == 9
    head.fit(head.inputs(f, xy, 0.5), y)
    acc_plain = (plain.predict(ft) == yt).mean()
    acc_ctx = (head.predict(head.inputs(ft, xyt, 0.5)) == yt).mean()
    assert acc_ctx > acc_plain + 0.1 and acc_ctx > 0.9
    with pytest.raises(DenucError, match="inputs"):
        head.predict(ft)  # encoder features where inputs belong: a clear error, not garbage

    path = head.save(tmp_path / "h.safetensors")
    loaded = LinearHead.load(path)
    assert loaded.context_um == 20.0 and loaded.input_dim == 9 and loaded.feature_dim == 4
    np.testing.assert_allclose(loaded.predict_proba(loaded.inputs(ft, xyt, 0.5)), head.predict_proba(head.inputs(ft, xyt, 0.5)), atol=1e-6)

    loaded.prior = (head.inputs(f, xy, 0.5), y, ("a", "b"))
    x_new = loaded.inputs(ft, xyt, 0.5)
    res = retrain_head(loaded, x_new[:20], yt[:20], ("a", "b", "c"), None, tmp_path / "h2.safetensors", cv=False)
    again = LinearHead.load(tmp_path / "h2.safetensors")
    assert again.context_um == 20.0 and again.input_dim == 9 and res.head.class_names == ("a", "b", "c")
    assert (again.predict(x_new) == yt).mean() > 0.85  # kept what it knew


def test_rethresholding_reads_context_among_the_kept_nuclei_only():
    rng = np.random.default_rng(2)
    f, xy, y = _tissue(rng, n_clusters=4)
    head = LinearHead(4, ["a", "b"], context_um=40.0)
    head.fit(head.inputs(f, xy, 0.5), y)
    scores = rng.permutation(np.linspace(0.05, 0.95, len(xy)))  # every cluster loses some
    probs = head.predict_proba(head.inputs(f, xy, 0.5))
    cands = Candidates(Detections(xy, scores, probs.argmax(1), ("a", "b"), (), probs), f, 0.1, head=head, mpp=0.5)
    det, feats = cands.select(0.5)
    keep = scores > 0.5
    expected = head.predict_proba(head.inputs(f[keep], xy[keep], 0.5))
    np.testing.assert_allclose(det.probs, expected, atol=1e-6)
    assert not np.allclose(det.probs, probs[keep])  # the dropped candidates no longer count as neighbours
