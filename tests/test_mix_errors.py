"""`warren mix` on bad input: one line on stderr, exit 2, no traceback; outputs kept
apart from inputs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}
CONV = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]


def warren(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "flows.cli", "mix", *args, "--quiet"], cwd=cwd,
                          capture_output=True, text=True, env=ENV)


def one_line(p, rc=2):
    """The single line of stderr (asserting there is nothing else)."""
    assert p.returncode == rc, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40 + b"\xff\xd9")
    (tmp_path / "a.json").write_text(json.dumps([{"id": "x", "conversations": CONV}]))
    (tmp_path / "r.yaml").write_text("name: t\nimage_root: images\nsources:\n  - {name: a, path: a.json}\n")
    return tmp_path


def test_a_broken_json_list_is_one_line_and_nothing_else(tmp_path):
    # today's bug: the line was followed by two ParquetWriter.__del__ tracebacks
    path = tmp_path / "broken.json"
    text = ('[{"id": "a", "conversations": [{"from": "human", "value": "Q"}, '
            '{"from": "gpt", "value": "A"}]}, {"id": 2,,}]')
    path.write_text(text)
    at = text.index(",,") + 1                   # where a property name was expected
    (tmp_path / "r.yaml").write_text("name: x\nsources:\n  - {name: a, path: broken.json}\n")
    p = warren("--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "out"))
    assert one_line(p) == (f"warren mix: error: {path}: record 1 is not valid JSON (Expecting property name "
                           f"enclosed in double quotes at character {at}); the list cannot be read past it")
    # nothing half-written is left under a final name
    assert not os.path.exists(tmp_path / "out" / "mix.parquet")
    assert not [f for f in os.listdir(tmp_path / "out" / "_work")]


@pytest.mark.parametrize("where, message", [
    ("images", "--output {out} is the input {images}: choose a separate folder"),
    ("images/sub", "--output {out} lies inside the input {images}: choose a folder outside it"),
    (".", "--output {out} contains the input {a}: choose a folder that does not hold the input"),
])
def test_output_apart_from_every_input(data, where, message):
    out = str(data / where) if where != "." else str(data)
    p = warren("--recipe", str(data / "r.yaml"), "--output", out)
    want = message.format(out=out, images=str(data / "images"), a=str(data / "a.json"))
    assert one_line(p) == f"warren mix: error: {want}"
    assert sorted(os.listdir(data / "images")) == ["a.jpg"] and not os.path.exists(data / "mix.parquet")


def test_export_over_a_source_file_is_refused(data):
    p = warren("--recipe", str(data / "r.yaml"), "--output", str(data / "out"),
               "--export-llava", str(data / "a.json"))
    assert one_line(p) == (f"warren mix: error: --export-llava {data / 'a.json'} is the input "
                           f"{data / 'a.json'}: choose a separate folder")
    assert json.loads((data / "a.json").read_text()) == [{"id": "x", "conversations": CONV}]


def test_lone_surrogate_is_a_reject_not_a_crash(tmp_path):
    # "\ud83d" is valid JSON but not Unicode text: the run used to die with UnicodeEncodeError
    (tmp_path / "s.json").write_text('[{"id": "a", "conversations": [{"from": "human", "value": "Q\\ud83d"}, '
                                     '{"from": "gpt", "value": "A"}]}, {"id": "b", "conversations": '
                                     + json.dumps(CONV) + "}]")
    (tmp_path / "r.yaml").write_text("name: x\nsources:\n  - {name: a, path: s.json}\n")
    p = warren("--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "out"))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["kept"], summary["rejected"]) == (1, 1)
    import polars as pl
    rej = pl.read_parquet(tmp_path / "out" / "rejects.parquet").row(0, named=True)
    assert rej["reason"] == "bad_text: turn 0 holds a lone surrogate (\\ud83d) at character 1"
    assert (rej["uid"], rej["row"], rej["file"]) == ("a:0", 0, str(tmp_path / "s.json"))


def test_output_that_is_a_file_is_one_line(data):
    (data / "taken").write_text("a user's file")
    p = warren("--recipe", str(data / "r.yaml"), "--output", str(data / "taken"))
    assert one_line(p) == (f"warren mix: error: cannot write {data / 'taken'}: a file is in the way of the "
                           "output folder; free space (or fix the folder) and rerun the same command to resume")
    assert (data / "taken").read_text() == "a user's file"


def test_a_full_disk_is_one_error_naming_the_output(data, monkeypatch):
    import errno

    from pipelines import storage
    from pipelines.errors import OutputError
    from pipelines.mix import build, recipe
    real = storage.atomic_open

    def full(path, mode="wb"):
        if str(path).endswith("mix.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)
    monkeypatch.setattr(storage, "atomic_open", full)
    r = recipe.load(str(data / "r.yaml"))
    with pytest.raises(OutputError, match=r"cannot write .*out: No space left on device; free space"):
        build.run(r, str(data / "out"))
    monkeypatch.setattr(storage, "atomic_open", real)
    assert build.run(r, str(data / "out"))["kept"] == 1          # rerun resumes: the prepared source is reused
