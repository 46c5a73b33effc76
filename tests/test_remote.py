"""Shards from a URL or a pipe: command (fastceleba/remote.py, the wds loader, tools/stage.py),
against a real HTTP server on 127.0.0.1 that each test module starts and stops itself; it can
drop the connection in the middle of a file, serve a file cut short, or serve a corrupt one."""

import functools
import http.server
import importlib.util
import json
import shlex
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from fastceleba.errors import DataError
from fastceleba.loaders import KINDS, make_loader
from fastceleba.shards import MANIFEST, read_index, verify

spec = importlib.util.spec_from_file_location("stage_cli", ROOT / "tools" / "stage.py")
stage_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_cli)


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard directory; ``server.faults[name] = (kind, n)`` misbehaves for one file:
    "drop" announces the full length, sends n bytes and closes the connection; "cut" serves only
    the first n bytes as if that were the whole file; "flip" corrupts the byte at n."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        fault = self.server.faults.get(name)
        if fault is None:
            return super().do_GET()
        kind, n = fault
        data = (Path(self.directory) / name).read_bytes()
        if kind == "flip":
            data = data[:n] + bytes([data[n] ^ 0xFF]) + data[n + 1:]
        body = data[:n] if kind in ("drop", "cut") else data
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) if kind == "drop" else len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def server(shards):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=str(shards)))
    srv.daemon_threads = True
    srv.faults = {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def http_shards(server):
    server.faults.clear()
    yield server
    server.faults.clear()


def batches(data, split="train", **kw):
    kw = dict(dict(shuffle=True, seed=3, flip=True, num_workers=2), **kw)
    return list(make_loader("wds", data, split, 24, **kw))


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def header_offset(shards, tar, sample):  # where a sample's first tar header starts
    entry = next(s for e in json.loads((shards / MANIFEST).read_text())["splits"].values()
                 for s in e["shards"] if s["tar"] == tar)
    first = read_index(shards / entry["index"], entry["num_samples"])[sample]
    return min(off for off, _ in first.values()) - 512


def one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_wds_over_http_gives_the_same_batches_as_the_directory(shards, http_shards):
    assert_same(batches(http_shards.url), batches(shards))
    for rank in range(2):  # ranks, padding and workers follow the same plan over http
        kw = dict(rank=rank, world_size=2, drop_last=False, num_workers=1)
        assert_same(batches(http_shards.url, "valid", **kw), batches(shards, "valid", **kw))


def test_wds_over_a_pipe_command(shards):
    data = f"pipe:cat {shlex.quote(str(shards))}/{{name}}"
    assert_same(batches(data, "valid"), batches(shards, "valid"))


def test_connection_dropped_mid_tar_is_an_error_naming_the_url(shards, http_shards):
    http_shards.faults["train-00001.tar"] = ("drop", header_offset(shards, "train-00001.tar", 5) + 700)  # in a jpg
    with pytest.raises(DataError, match=r"tar: streaming failed \(curl exit 18: the connection closed") as e:
        batches(http_shards.url, shuffle=False)
    assert http_shards.url + "train-00001.tar" in str(e.value) and "\n" not in str(e.value)


def test_tar_cut_at_a_sample_boundary_is_never_a_short_epoch(shards, http_shards):
    # tarfile ends quietly at a header boundary: only the per-shard count notices
    http_shards.faults["train-00002.tar"] = ("cut", header_offset(shards, "train-00002.tar", 10))
    with pytest.raises(DataError, match=r"train-00002\.tar: streamed 10 samples but the manifest says 50"):
        batches(http_shards.url, num_workers=1)


def test_missing_manifest_url_is_one_clear_line(http_shards, tmp_path, capsys):
    url = http_shards.url + "nope/"
    with pytest.raises(DataError, match=rf"^{url}manifest\.json: HTTP 404 .*directory holding manifest\.json"):
        make_loader("wds", url, "train", 8)
    err = one_line_error(capsys, stage_cli.main([url, str(tmp_path / "local"), "--no-progress"]))
    assert f"{url}manifest.json: HTTP 404" in err
    assert not (tmp_path / "local").exists()


def test_kinds_that_need_local_files_say_how_to_stage(http_shards):
    for kind in set(KINDS) - {"wds"}:
        with pytest.raises(DataError, match=rf"the {kind} loader needs local files; .*tools/stage\.py "):
            make_loader(kind, http_shards.url, "train", 8)
    with pytest.raises(DataError, match="sha256 cannot be checked while streaming"):
        make_loader("wds", http_shards.url, "train", 8, verify=True)
    with pytest.raises(DataError, match=r"pipe:aws s3 cp s3://b/shards/\{name\} -"):
        make_loader("wds", "s3://b/shards", "train", 8)


def test_staged_directory_is_read_by_every_loader(shards, http_shards, tmp_path):
    dest = tmp_path / "local"
    assert stage_cli.main([http_shards.url, str(dest), "--no-progress"]) == 0
    assert verify(dest, progress=False) == []
    for path in shards.iterdir():
        if path.is_file():
            assert (dest / path.name).read_bytes() == path.read_bytes(), path.name
    for kind in KINDS:
        got = sorted(n for b in make_loader(kind, dest, "valid", 8, num_workers=1) for n in b["num"].tolist())
        want = sorted(n for b in make_loader(kind, shards, "valid", 8, num_workers=1) for n in b["num"].tolist())
        assert got == want, kind
    assert stage_cli.main([http_shards.url, str(dest), "--no-progress"]) == 0  # all there: nothing to do


def test_stage_some_splits_then_more_from_a_pipe(shards, tmp_path):
    dest, src = tmp_path / "local", f"pipe:cat {shlex.quote(str(shards))}/{{name}}"
    assert stage_cli.main([src, str(dest), "--split", "valid", "--no-progress"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "valid-00000.idx", "valid-00000.tar", "validset-keys.txt"]
    with pytest.raises(DataError, match="no split 'train'; choose one of valid"):
        make_loader("turbo", dest, "train", 8)
    assert stage_cli.main([src, str(dest), "--split", "test", "--no-progress"]) == 0
    assert verify(dest, progress=False) == []
    assert len(list(make_loader("turbo", dest, "test", 8))) == 3


def test_stage_dropped_connection_then_resumes(shards, http_shards, tmp_path, capsys):
    dest = tmp_path / "local"
    http_shards.faults["train-00002.tar"] = ("drop", 30000)
    err = one_line_error(capsys, stage_cli.main([http_shards.url, str(dest), "--no-progress"]))
    assert f"{http_shards.url}train-00002.tar: " in err and "re-run the same command to resume" in err
    done = {p.name: p.stat() for p in dest.iterdir()}
    assert "train-00001.tar" in done and "train-00002.tar" not in done and MANIFEST not in done
    assert not list(dest.glob(".*.tmp"))  # the partial download was removed
    (dest / ".train-00002.tar.k1ll3d.tmp").write_bytes(b"left by a killed run")
    http_shards.faults.clear()
    assert stage_cli.main([http_shards.url, str(dest), "--no-progress"]) == 0
    for name, st in done.items():  # finished files were kept, not fetched again
        if name.endswith(".tar"):
            assert (dest / name).stat().st_ino == st.st_ino and (dest / name).stat().st_mtime_ns == st.st_mtime_ns
    assert not list(dest.glob(".*.tmp"))
    assert verify(dest, progress=False) == []


def test_stage_refuses_a_corrupt_source(shards, http_shards, tmp_path, capsys):
    http_shards.faults["valid-00000.tar"] = ("flip", 5000)
    code = stage_cli.main([http_shards.url, str(tmp_path / "local"), "--split", "valid", "--no-progress"])
    assert "valid-00000.tar: sha256 does not match the manifest" in one_line_error(capsys, code)
    assert not (tmp_path / "local" / "valid-00000.tar").exists()


def test_stage_help_and_bad_input(capsys, tmp_path, shards):
    with pytest.raises(SystemExit) as e:
        stage_cli.main(["--help"])
    assert e.value.code == 0 and "--split" in capsys.readouterr().out
    err = one_line_error(capsys, stage_cli.main([str(tmp_path / "none"), str(tmp_path / "d")]))
    assert "no such directory" in err
    err = one_line_error(capsys, stage_cli.main([str(shards), str(shards)]))
    assert "SRC and DEST are the same directory" in err
