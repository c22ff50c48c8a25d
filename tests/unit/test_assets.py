"""The pinned-wheel fetcher: verified download, cache reuse without network, refusal of bad files."""

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from igdrec import assets, schema
from igdrec.config import PreprocessConfig
from igdrec.errors import IgdrecError
from igdrec.rundir import RunDir
from windows_reference import as_tuples, brute_force

MEMBERS = ("pkg/data/a.txt", "pkg/data/b.txt")


def make_wheel(path, contents):
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in contents.items():
            archive.writestr(member, text)
    return path


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A wheel served by a stand-in for `pip download`; counts the downloads."""
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IGDREC_OFFLINE", raising=False)
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data/a.txt": "alpha", "pkg/data/b.txt": "beta", "pkg/x.py": ""})
    downloads = []

    def download(asset, into):
        downloads.append(asset.requirement)
        return Path(shutil.copy(wheel, into))

    monkeypatch.setattr(assets, "_download_wheel", download)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return assets.WheelAsset(name="pkg", requirement="pkg==1.0", wheel_sha256=sha, members=MEMBERS), downloads


def test_fetch_extracts_members_and_reuses_the_cache(fake_registry):
    asset, downloads = fake_registry
    files = assets.fetch(asset)
    assert {m: p.read_text() for m, p in files.items()} == {"pkg/data/a.txt": "alpha", "pkg/data/b.txt": "beta"}
    assert assets.fetch(asset, offline=True) == files and downloads == ["pkg==1.0"]


def test_damaged_cache_is_fetched_again(fake_registry):
    asset, downloads = fake_registry
    files = assets.fetch(asset)
    files["pkg/data/a.txt"].write_text("alphA")
    assert assets.fetch(asset)["pkg/data/a.txt"].read_text() == "alpha" and len(downloads) == 2


def test_sha_mismatch_is_refused_and_nothing_is_cached(fake_registry):
    asset, _ = fake_registry
    bad = assets.WheelAsset(name="pkg", requirement="pkg==1.0", wheel_sha256="0" * 64, members=MEMBERS)
    with pytest.raises(IgdrecError, match="does not match the pinned"):
        assets.fetch(bad)
    assert not (assets.cache_root() / "assets").exists() or not any((assets.cache_root() / "assets").iterdir())


def test_missing_member_and_member_pin(fake_registry):
    asset, _ = fake_registry
    missing = assets.WheelAsset(name="pkg", requirement=asset.requirement, wheel_sha256=asset.wheel_sha256, members=("pkg/nope",))
    with pytest.raises(IgdrecError, match="member pkg/nope is missing"):
        assets.fetch(missing)
    pinned = assets.WheelAsset(name="pkg", requirement=asset.requirement, wheel_sha256=asset.wheel_sha256, members=MEMBERS,
                               member_sha256=(("pkg/data/a.txt", "f" * 64),))
    with pytest.raises(IgdrecError, match="does not match the pinned"):
        assets.fetch(pinned)
    assert not any((assets.cache_root() / "assets").iterdir())  # no staging directory left behind


def test_offline_without_cache_is_an_error(fake_registry, monkeypatch):
    asset, downloads = fake_registry
    monkeypatch.setenv("IGDREC_OFFLINE", "1")
    with pytest.raises(IgdrecError, match="IGDREC_OFFLINE=1"):
        assets.fetch(asset)
    assert downloads == []


@pytest.mark.network
def test_real_ml100k_wheel(tmp_path, monkeypatch):
    from igdrec.stages import preprocess

    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IGDREC_OFFLINE", raising=False)
    files = assets.fetch(assets.ML100K)
    assert set(files) == set(assets.ML100K.members)
    run = RunDir(tmp_path / "run")
    stats = preprocess.run(PreprocessConfig(), run)["stats"]
    assert (stats["users"], stats["items"], stats["interactions"], stats["windows"]) == (943, 1682, 100_000, 99_057)
    assert (stats["train"], stats["valid"], stats["test"]) == (79_245, 9_906, 9_906)

    # The same windows by brute force from the raw atomic files (ids = row order of the item file).
    item_rows = files["recbole/dataset_example/ml-100k/ml-100k.item"].read_text().splitlines()[1:]
    dense = {line.split("\t")[0]: i for i, line in enumerate(item_rows)}
    ratings = [line.split("\t") for line in files["recbole/dataset_example/ml-100k/ml-100k.inter"].read_text().splitlines()[1:]]
    expected = brute_force([(u, dense[i], int(float(t))) for u, i, _, t in ratings], history_len=10)
    for split, want in zip(("train", "valid", "test"), expected):
        got = schema.read(run.artifact("data", f"{split}.parquet"), "samples")
        assert as_tuples(got) == want
    titles = schema.read(run.artifact("data", "items.parquet"), "items")["title"]
    assert titles[0] == "Toy Story (1995)" and titles[266] == "unkonwn"
