"""python -m pipeline.download: official dataset zips from a local HTTP server (a thread on
127.0.0.1) into shards, and the archive checks (checksum, paths, links, zip bombs)."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import datasets, download
from pipeline.shards import read_manifest

COUNTS = {"trainA": 3, "trainB": 2, "testA": 2, "testB": 1}


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 37 % 256, 90, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def _images(name: str) -> dict[str, bytes]:
    """Member name -> bytes of an official-layout archive of ``name``."""
    return {
        f"{name}/{split}/{split}_{i:02d}.jpg": _jpeg(seed)
        for seed, (split, i) in enumerate(
            (split, i) for split, count in COUNTS.items() for i in range(count)
        )
    }


def write_zip(path: Path, members: dict[str, bytes], folders: bool = True) -> bytes:
    """A zip of ``members`` (with folder entries, as ``zip -r`` writes them); returns its bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if folders:
            for folder in sorted({m.rsplit("/", 1)[0] + "/" for m in members if "/" in m}):
                archive.writestr(folder, "")
        for member, data in members.items():
            archive.writestr(member, data)
    return path.read_bytes()


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        self.server.requests.append(self.path)


class ZipServer:
    """A static HTTP server on 127.0.0.1 in a thread, serving ``root``; ``requests`` lists the
    paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
        )
        self.httpd.requests = self.requests = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(tmp_path, monkeypatch):
    # A proxy configured on the machine must not get requests for the local server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    (root / "datasets").mkdir(parents=True)
    served = ZipServer(root)
    yield served
    served.close()


def _serve(server: ZipServer, name: str, members: dict[str, bytes], **kwargs) -> bytes:
    return write_zip(server.root / "datasets" / f"{name}.zip", members, **kwargs)


def _keys(dest: Path, split: str) -> list[str]:
    manifest = read_manifest(str(dest))
    table = pq.read_table(manifest.shard_paths(split), filesystem=manifest.filesystem)
    return table.column("key").to_pylist()


def test_download_writes_shards_with_the_counts_of_each_split(tmp_path, server, capsys):
    members = _images("mini")
    data = _serve(server, "mini", members)
    digest = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "data" / "mini"

    assert download.main(["mini", str(dest), "--url", server.url]) == 0
    out, err = capsys.readouterr()
    assert digest in out and digest in err
    manifest = read_manifest(str(dest))
    assert {name: manifest.count(name) for name in manifest.datasets} == COUNTS
    assert manifest.source == f"{server.url}/mini.zip"
    assert _keys(dest, "trainA") == ["trainA_00.jpg", "trainA_01.jpg", "trainA_02.jpg"]
    table = pq.read_table(manifest.shard_paths("testA"), filesystem=manifest.filesystem)
    assert table.column("image").to_pylist() == [
        members["mini/testA/testA_00.jpg"],
        members["mini/testA/testA_01.jpg"],
    ]
    # The work folder (zip and extracted images) is gone.
    assert sorted(os.listdir(dest)) == ["manifest.json", "testA", "testB", "trainA", "trainB"]

    # A second run refuses the dataset there before downloading anything.
    asked = len(server.requests)
    assert download.main(["mini", str(dest), "--url", server.url]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert len(server.requests) == asked

    # With the right checksum and --overwrite it replaces it.
    argv = ["mini", str(dest), "--url", server.url, "--sha256", digest.upper(), "--overwrite"]
    assert download.main(argv) == 0
    assert read_manifest(str(dest)).count("trainB") == COUNTS["trainB"]


def test_a_zip_with_the_splits_at_its_top_is_imported_too(tmp_path, server):
    _serve(server, "facades", {m.split("/", 1)[1]: d for m, d in _images("facades").items()})
    summary = datasets.download_official("facades", str(tmp_path / "f"), base_url=server.url)
    assert {name: d["count"] for name, d in summary["datasets"].items()} == COUNTS


def test_download_to_an_fsspec_uri_keeps_the_work_folder_there(server):
    import fsspec

    _serve(server, "mini", _images("mini"))
    folder = f"/download-{os.getpid()}-{threading.get_ident()}"
    memory = fsspec.filesystem("memory")
    try:
        datasets.download_official("mini", f"memory:/{folder}/mini", base_url=server.url)
        assert read_manifest(f"memory:/{folder}/mini").count("testA") == COUNTS["testA"]
        files = memory.find(folder)
        assert f"{folder}/mini/manifest.json" in files
        assert not [f for f in files if datasets.WORK_PREFIX in f]
    finally:
        if memory.exists(folder):
            memory.rm(folder, recursive=True)


def test_a_bad_checksum_is_refused_and_leaves_nothing(tmp_path, server, capsys):
    data = _serve(server, "mini", _images("mini"))
    dest = tmp_path / "new"
    argv = ["mini", str(dest / "mini"), "--url", server.url, "--sha256", "0" * 64]
    assert download.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and hashlib.sha256(data).hexdigest() in err
    assert not dest.exists(), "the folders it created are gone"

    # A DEST that was there keeps what it held, and only that.
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert download.main(["mini", str(dest), "--url", server.url, "--sha256", "ab" * 32]) == 2
    assert os.listdir(dest) == ["notes.txt"]

    assert download.main(["mini", str(dest), "--url", server.url, "--sha256", "xyz"]) == 2
    assert "not 64 hex digits" in capsys.readouterr().err


def test_a_member_that_leaves_the_folder_is_refused(tmp_path, server, capsys):
    evil = {**_images("mini"), "mini/trainA/../../../evil.jpg": _jpeg(1)}
    _serve(server, "mini", evil, folders=False)
    dest = tmp_path / "sub" / "dest"
    assert download.main(["mini", str(dest), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "mini/trainA/../../../evil.jpg" in err and "leaves the folder" in err
    assert not dest.exists() and not list(tmp_path.rglob("evil.jpg"))


@pytest.mark.parametrize("name", ["../x.jpg", "/etc/passwd", "C:/x.jpg", "a\\..\\..\\x.jpg"])
def test_member_paths_that_escape_are_refused(name):
    with pytest.raises(datasets.DownloadError, match="leaves the folder"):
        datasets.member_parts(name)


def test_member_paths_inside_are_kept():
    assert datasets.member_parts("a/./b//c.jpg") == ["a", "b", "c.jpg"]
    assert datasets.member_parts("mini\\trainA\\x.jpg") == ["mini", "trainA", "x.jpg"]


def test_an_unknown_name_lists_the_known_ones(tmp_path, server, capsys):
    assert download.main(["horse2zebraa", str(tmp_path / "d"), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "horse2zebraa" in err
    assert all(name in err for name in datasets.OFFICIAL_NAMES)
    assert not server.requests and not (tmp_path / "d").exists()


def test_cityscapes_is_not_asked_of_the_official_server(tmp_path, no_network):
    with pytest.raises(datasets.DownloadError, match="cityscapes-dataset.com"):
        datasets.download_official("cityscapes", str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_zip_bombs_are_refused_before_extraction(tmp_path, server):
    dest = tmp_path / "d"
    _serve(server, "mini", {**_images("mini"), "mini/trainA/zeros.bmp": bytes(4 * 1024 * 1024)})
    with pytest.raises(datasets.DownloadError, match=r"'mini/trainA/zeros.bmp'.*zip bomb"):
        datasets.download_official("mini", str(dest), base_url=server.url)
    assert not dest.exists()

    _serve(server, "mini", _images("mini"))
    small = datasets.ZipLimits(total_bytes=2000)
    with pytest.raises(datasets.DownloadError, match="over the limit of 2000"):
        datasets.download_official("mini", str(dest), base_url=server.url, limits=small)
    with pytest.raises(datasets.DownloadError, match="over the limit of 100"):
        datasets.download_official(
            "mini", str(dest), base_url=server.url, limits=datasets.ZipLimits(member_bytes=100)
        )
    with pytest.raises(datasets.DownloadError, match="members, over the limit of 5"):
        datasets.download_official(
            "mini", str(dest), base_url=server.url, limits=datasets.ZipLimits(members=5)
        )
    with pytest.raises(datasets.DownloadError, match="over the limit of 1000 bytes"):
        datasets.download_official(
            "mini", str(dest), base_url=server.url, limits=datasets.ZipLimits(archive_bytes=1000)
        )
    assert not dest.exists()


def test_links_and_duplicates_are_refused(tmp_path, server):
    path = server.root / "datasets" / "mini.zip"
    write_zip(path, _images("mini"))
    with zipfile.ZipFile(path, "a") as archive:
        link = zipfile.ZipInfo("mini/trainA/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(datasets.DownloadError, match="'mini/trainA/link.jpg': a symbolic link"):
        datasets.download_official("mini", str(tmp_path / "d"), base_url=server.url)

    write_zip(path, _images("mini"))
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr("mini/trainA/trainA_00.jpg", _jpeg(9))
    with pytest.raises(datasets.DownloadError, match="twice"):
        datasets.download_official("mini", str(tmp_path / "d"), base_url=server.url)
    assert not (tmp_path / "d").exists()


def test_split_folders_are_found_in_one_place_only():
    files = {
        "x/trainA/a.jpg": ["x", "trainA", "a.jpg"],
        "x/README": ["x", "README"],
        "__MACOSX/x/trainA/._a.jpg": ["__MACOSX", "x", "trainA", "._a.jpg"],
    }
    assert datasets.split_files(files) == {"x/trainA/a.jpg": ["trainA", "a.jpg"]}
    with pytest.raises(datasets.DownloadError, match="more than one place"):
        datasets.split_files({**files, "y/testB/b.jpg": ["y", "testB", "b.jpg"]})
    with pytest.raises(datasets.DownloadError, match="no trainA, trainB, testA, testB folders"):
        datasets.split_files({"x/train/a.jpg": ["x", "train", "a.jpg"]})


def test_what_is_not_a_dataset_zip_is_named(tmp_path, server):
    (server.root / "datasets" / "mini.zip").write_text("<html>moved</html>")
    with pytest.raises(datasets.DownloadError, match="not a zip archive"):
        datasets.download_official("mini", str(tmp_path / "d"), base_url=server.url)
    with pytest.raises(datasets.DownloadError, match=r"maps\.zip: HTTP 404"):
        datasets.download_official("maps", str(tmp_path / "d"), base_url=server.url)
    with pytest.raises(datasets.DownloadError, match="not an http"):
        datasets.download_official("maps", str(tmp_path / "d"), base_url="ftp://127.0.0.1/x")
    _serve(server, "mini", {"mini/train/a.jpg": _jpeg(0)})
    with pytest.raises(datasets.DownloadError, match=r"no trainA.*\(it holds: mini\)"):
        datasets.download_official("mini", str(tmp_path / "d"), base_url=server.url)
    assert not (tmp_path / "d").exists()


@pytest.mark.integration
def test_the_command_downloads_and_imports(tmp_path, server):
    data = _serve(server, "mini", _images("mini"))
    dest = tmp_path / "mini"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.download", "mini", str(dest), "--url", server.url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(data).hexdigest() in result.stdout
    assert read_manifest(str(dest)).count("trainA") == COUNTS["trainA"]
