"""Image files of the mix: header checks, and runs keyed by the image root's content."""
import io
import json
import logging
import os

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipelines import runkey
from pipelines.mix import build, images, recipe


def encoded(fmt: str, size=(40, 30), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


FILES = {
    # readable
    "ok.jpg": encoded("JPEG"), "ok.png": encoded("PNG"), "ok.gif": encoded("GIF"),
    "ok.webp": encoded("WEBP"), "ok.bmp": encoded("BMP"),
    "gif-named.jpg": encoded("GIF"),                               # OCR-VQA ships these
    "jpeg-trailing-junk.jpg": encoded("JPEG") + b"\x00" * 2000,    # decodes: Pillow stops at EOI
    "png-trailing-junk.png": encoded("PNG") + b"garbage" * 50,
    "sub/deeper/ok.jpg": encoded("JPEG", seed=1),
    # unreadable
    "empty.jpg": b"",
    "truncated.jpg": encoded("JPEG")[:600],
    "truncated.png": encoded("PNG")[:500],
    "truncated.webp": encoded("WEBP")[:200],
    "truncated.gif": encoded("GIF")[:300],
    "html.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
    "text.png": b"just some text, not an image at all\n",
}
UNREADABLE = {"empty.jpg", "truncated.jpg", "truncated.png", "truncated.webp", "truncated.gif",
              "html.jpg", "text.png"}


@pytest.fixture()
def root(tmp_path):
    for name, data in FILES.items():
        p = tmp_path / "img" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (tmp_path / "img" / "._ok.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")   # macOS metadata
    (tmp_path / "img" / ".cache").mkdir()
    (tmp_path / "img" / ".cache" / "x.jpg").write_bytes(encoded("JPEG"))
    return str(tmp_path / "img")


def test_header_verdicts_match_what_pillow_can_decode(root):
    idx = images.ImageIndex(root)
    assert idx.files == set(FILES)                          # hidden names are not listed
    idx.check(list(FILES) * 3)                              # duplicates: checked once
    got = {name: idx.problem(name) for name in FILES}
    assert {n for n, why in got.items() if why} == UNREADABLE
    assert got["empty.jpg"] == "empty.jpg is empty (0 bytes)"
    assert got["html.jpg"] == "html.jpg is not an image Pillow can read (starts with b'<!DOCTYPE ht')"
    assert got["truncated.jpg"].startswith("truncated.jpg cannot be decoded (OSError: ")
    # ground truth: a full decode with Pillow, file by file
    for name in FILES:
        try:
            with Image.open(os.path.join(root, name)) as im:
                im.load()
            ok = True
        except Exception:
            ok = False
        assert ok == (got[name] is None), name
    st = idx.stats()
    assert (st["listed"], st["checked"], st["unreadable"]) == (len(FILES), len(FILES), len(UNREADABLE))


@pytest.mark.parametrize("name, fmt", [("ok.jpg", "JPEG"), ("ok.png", "PNG"), ("ok.gif", "GIF"),
                                       ("ok.webp", "WEBP"), ("ok.bmp", "BMP")])
def test_complete_files_pass_on_their_first_and_last_bytes_alone(name, fmt):
    data = FILES[name]
    assert images.complete(data[:images.EDGE], data[-images.EDGE:], len(data))
    cut = data[:len(data) // 2]
    assert not images.complete(cut[:images.EDGE], cut[-images.EDGE:], len(cut))


def test_parallel_checks_give_the_serial_verdicts(tmp_path):
    rng = np.random.default_rng(0)
    good, bad = encoded("JPEG"), encoded("JPEG")[:300]
    names = []
    for i in range(400):
        name = f"d{i % 7}/{i:04d}.jpg"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(bad if rng.random() < 0.1 else good)
        names.append(name)
    serial = images.ImageIndex(str(tmp_path), workers=1)
    parallel = images.ImageIndex(str(tmp_path), workers=8)
    serial.check(names)
    parallel.check(reversed(names))
    streamed = images.ImageIndex(str(tmp_path), workers=4)      # as prepare uses it: ahead, then ask
    for n in names + names:
        streamed.prefetch(n)
    got = {n: streamed.problem(n) for n in names}
    streamed.close()
    assert {n: serial.problem(n) for n in names} == {n: parallel.problem(n) for n in names} == got
    assert 0 < serial.stats()["unreadable"] == parallel.stats()["unreadable"] < 400
    assert streamed.stats()["checked"] == 400


# ------------------------------------------------------------------ runs keyed by input

def conv(q="What is it?"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A thing."}]


@pytest.fixture()
def data(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (img / name).write_bytes(encoded("JPEG"))
    # ids repeat (as in LLaVA-665K): the records differ by image and question
    items = [{"id": "same", "image": n, "conversations": conv(f"Q about {n}?")} for n in ("a.jpg", "b.jpg", "c.jpg")]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    (tmp_path / "wiz.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(5)]))
    r = recipe.from_dict({"name": "t", "image_root": "images", "sources": [
        {"name": "l", "path": "llava.json"}, {"name": "w", "path": "wiz.json", "format": "wizardlm"}]},
        data_root=str(tmp_path))
    return tmp_path, r


def outcome(out):
    mix = pl.read_parquet(os.path.join(out, "mix.parquet"))
    rej = pl.read_parquet(os.path.join(out, "rejects.parquet"))
    got = {u: "kept" for u in mix["uid"].to_list()}
    got.update({u: r.split(":", 1)[0] for u, r in rej.select("uid", "reason").iter_rows()})
    return got


def marker(out, name):
    return json.load(open(os.path.join(out, "_completions", f"prepare-{name}.json")))


def test_a_changed_image_root_is_refused_until_restart(data):
    tmp, r = data
    out = str(tmp / "out")
    build.run(r, out)
    assert outcome(out) == {"l:0": "kept", "l:1": "kept", "l:2": "image_not_found",
                            **{f"w:{i}": "kept" for i in range(5)}}
    wiz = marker(out, "w")
    assert marker(out, "l")["uses_images"] and not wiz["uses_images"]

    (tmp / "images" / "c.jpg").write_bytes(encoded("JPEG"))         # added: would now be kept
    with pytest.raises(runkey.StaleRunError, match=r"source l: images: .*added c\.jpg.*--restart"):
        build.run(r, out)
    assert outcome(out)["l:2"] == "image_not_found"                 # nothing stale was written
    build.run(r, out, restart_run=True)
    assert outcome(out)["l:2"] == "kept"

    os.remove(tmp / "images" / "a.jpg")                             # removed: now a reject
    (tmp / "images" / "b.jpg").write_bytes(b"")                     # emptied under the same name
    with pytest.raises(runkey.StaleRunError, match=r"removed a\.jpg.*changed b\.jpg"):
        build.run(r, out)
    build.run(r, out, restart_run=True)
    got = outcome(out)
    assert (got["l:0"], got["l:1"], got["l:2"]) == ("image_not_found", "image_unreadable", "kept")


def test_prepare_redoes_only_a_stale_source(data, caplog):
    # The flow's per-source tasks never reuse a stale prepared source either; a source
    # without images does not depend on the image root.
    tmp, r = data
    out = str(tmp / "out")
    build.run(r, out)
    wiz = marker(out, "w")
    caplog.set_level(logging.INFO, logger="pipelines.mix.build")
    (tmp / "images" / "c.jpg").write_bytes(encoded("JPEG"))
    images = build.Images(r)
    try:
        for source in r.sources:
            build.prepare(r, source, out, images=images)
    finally:
        images.close()
    assert "l: images: " in caplog.text and "added c.jpg" in caplog.text
    assert marker(out, "w") == wiz


def test_a_changed_source_file_or_setting_is_refused(data):
    tmp, r = data
    out = str(tmp / "out")
    build.run(r, out)
    items = json.loads((tmp / "wiz.json").read_text())[:3]
    (tmp / "wiz.json").write_text(json.dumps(items))
    with pytest.raises(runkey.StaleRunError, match=r"source w: .*wiz\.json"):
        build.run(r, out)
    assert build.run(r, out, restart_run=True)["sources"]["w"]["input"] == 3
    r2 = recipe.from_dict({"name": "t", "image_root": "images", "limits": {"max_chars": 100}, "sources": [
        {"name": "l", "path": "llava.json"}, {"name": "w", "path": "wiz.json", "format": "wizardlm"}]},
        data_root=str(tmp))
    with pytest.raises(runkey.StaleRunError, match=r"its settings changed \(limits\)"):
        build.run(r2, out)


def test_restart_prepares_every_source_again(data):
    tmp, r = data
    out = str(tmp / "out")
    build.run(r, out)
    before = {n: os.stat(os.path.join(out, "_completions", f"prepare-{n}.json")).st_mtime_ns for n in "lw"}
    stale = os.path.join(out, "_work", "gone.candidates.parquet")
    open(stale, "wb").close()                                     # a source no longer in the recipe
    build.run(r, out, restart_run=True)
    after = {n: os.stat(os.path.join(out, "_completions", f"prepare-{n}.json")).st_mtime_ns for n in "lw"}
    assert all(after[n] != before[n] for n in "lw") and not os.path.exists(stale)
    assert outcome(out)["l:0"] == "kept"
