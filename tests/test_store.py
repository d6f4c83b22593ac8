import numpy as np
import pytest

from biomedsynth.store import ImageSet, ImageSetWriter


def test_round_trip_across_shards(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    with ImageSetWriter(tmp_path / "set", (6, 5, 3), shard_bytes=4 * 6 * 5 * 3) as w:
        for i, img in enumerate(imgs):
            w.add(img, image_id=f"im{i}", patient_id=f"00{i % 3}", age=20 + i)
    s = ImageSet(tmp_path / "set")
    assert len(s) == 11 and s.shape == (6, 5, 3) and s.shard_size == 4
    assert len(list((tmp_path / "set").glob("shard-*.npy"))) == 3
    assert all(np.array_equal(s[i], imgs[i]) for i in range(11)) and np.array_equal(s[-1], imgs[-1])
    assert s.meta["patient_id"].tolist()[:4] == ["000", "001", "002", "000"]  # ids stay strings
    assert s.meta["image_id"].tolist()[-1] == "im10" and s.meta["age"].tolist()[-1] == 30
    batches = list(s.batches([10, 0, 5], batch_size=2))
    assert [b.shape for b in batches] == [(2, 6, 5, 3), (1, 6, 5, 3)]
    assert np.array_equal(batches[0][0], imgs[10]) and np.array_equal(batches[1][0], imgs[5])


def test_failed_write_leaves_previous_set(tmp_path):
    with ImageSetWriter(tmp_path / "set", (2, 2, 1)) as w:
        w.add(np.zeros((2, 2), np.uint8), image_id="old")
    with pytest.raises(RuntimeError):
        with ImageSetWriter(tmp_path / "set", (2, 2, 1)) as w:
            w.add(np.ones((2, 2), np.uint8), image_id="new")
            raise RuntimeError("killed")
    assert ImageSet(tmp_path / "set").meta["image_id"].tolist() == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folder left behind


def test_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        with ImageSetWriter(tmp_path / "set", (4, 4, 1)) as w:
            w.add(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="not an image set"):
        ImageSet(tmp_path / "nothing")
