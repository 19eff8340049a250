"""One sidecar rule, one file-name sanitiser, one content hasher (io/naming.py)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from napari_denuc.io.naming import content_hash, file_fingerprint, safe_name, sidecar_path


def test_sidecar_is_beside_the_file():
    assert sidecar_path("w/head.safetensors") == Path("w/head.safetensors.json")
    from napari_denuc import head

    assert head.sidecar_path is sidecar_path  # heads use the shared rule


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Tumor: Positive", "Tumor_Positive"),
        ("timm:hf-hub:MahmoodLab/UNI2-h", "timm_hf-hub_MahmoodLab_UNI2-h"),
        ("lite-v1+aeeacbb0a7", "lite-v1+aeeacbb0a7"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "unnamed"),
        (".hidden", "hidden"),
        ("", "unnamed"),
        ("é/ü", "_"),
    ],
)
def test_safe_name(name, expected):
    out = safe_name(name)
    assert out == expected
    assert "/" not in out and not out.startswith(".")


def test_safe_name_is_bounded():
    assert len(safe_name("x" * 500)) == 80 and len(safe_name("x" * 500, max_len=10)) == 10


def test_content_hash_parts_and_types():
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    ref = hashlib.blake2b(b"shape" + a.tobytes(), digest_size=8).hexdigest()
    assert content_hash(["shape", a]) == ref
    assert content_hash([b"shape", a.tobytes()]) == ref
    assert content_hash(["shape", np.asfortranarray(a)]) == ref  # C-order bytes whatever the layout
    assert content_hash(["shape", a[:, ::2]]) != ref
    assert len(content_hash(["x"], digest_size=5)) == 10


def test_image_hash_and_lite_id_unchanged():
    # ids stored in shipped files must not move when the hashing code moves
    from napari_denuc.encoders.query import image_hash

    assert image_hash(np.arange(60, dtype=np.uint8).reshape(4, 5, 3)) == "1ffa94fa7e7522258becaf4ef26c3ad3"


def test_file_fingerprint_sees_head_tail_and_size(tmp_path):
    big = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
    p = tmp_path / "w.bin"
    p.write_bytes(big.tobytes())
    f0 = file_fingerprint(p)
    big[-1] ^= 1  # the last MiB counts
    p.write_bytes(big.tobytes())
    f1 = file_fingerprint(p)
    big[len(big) // 2] ^= 1  # the middle does not (a cheap fingerprint, by design)
    p.write_bytes(big.tobytes())
    assert f0 != f1 and file_fingerprint(p) == f1
    p.write_bytes(big.tobytes() + b"x")
    assert file_fingerprint(p) != f1
