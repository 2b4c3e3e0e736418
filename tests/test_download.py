"""Splitting metadata and downloading with img2dataset (a real subprocess, a real server)."""
from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import download
from pipelines.errors import InputError


def _meta(path, uids, urls=None, caption=True):
    cols = {"uid": uids, "url": urls or [f"http://127.0.0.1:9/{u}.jpg" for u in uids]}
    if caption:
        cols["caption"] = [f"c {u}" for u in uids]
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_split_cuts_parts_and_rejects_missing_urls(tmp_path):
    uids = [f"u{i:03d}" for i in range(25)]
    urls = [None if i == 3 else ("  " if i == 7 else f"http://h/{i}") for i in range(25)]
    info = download.split_input(_meta(tmp_path / "m.parquet", uids, urls), str(tmp_path / "w"), 10)
    assert info == {"parts": 3, "rows": 25, "missing_url": 2}
    parts = [pl.read_parquet(p) for p in download.read_parts(str(tmp_path / "w"))]
    assert [len(p) for p in parts] == [10, 10, 3]
    kept = [u for p in parts for u in p["uid"]]
    assert kept == [u for i, u in enumerate(uids) if i not in (3, 7)]
    rej = pl.read_parquet(tmp_path / "w" / "rejects" / "input.parquet")
    assert rej.sort("uid").rows() == [("u003", "input", "missing_url", None),
                                      ("u007", "input", "missing_url", None)]


def test_split_reads_a_folder_of_files(tmp_path):
    (tmp_path / "meta").mkdir()
    _meta(tmp_path / "meta" / "a.parquet", ["a1", "a2", "a3"])
    _meta(tmp_path / "meta" / "b.parquet", ["b1", "b2"])
    info = download.split_input(str(tmp_path / "meta"), str(tmp_path / "w"), 4)
    assert info["parts"] == 2 and info["rows"] == 5


@pytest.mark.parametrize("case, expect", [
    ("missing_column", "missing column 'caption'"),
    ("null_uid", "row 1, field 'uid': uid is null"),
    ("duplicate_uid", "row 2, field 'uid': duplicate uid"),
])
def test_split_bad_input_names_file_row_field(tmp_path, case, expect):
    p = tmp_path / "m.parquet"
    if case == "missing_column":
        _meta(p, ["a", "b"], caption=False)
    elif case == "null_uid":
        _meta(p, ["a", None, "c"])
    else:
        _meta(p, ["a", "b", "a"])
    with pytest.raises(InputError) as e:
        download.split_input(str(p), str(tmp_path / "w"), 10)
    assert expect in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("status, message, reason", [
    ("failed_to_download", "HTTP Error 404: File not found", "dead_link"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "dead_link"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "dead_link"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed"),
    ("failed_to_download", "something odd", "download_error"),
    ("failed_to_resize", "Image decoding error", "corrupt_image"),
    ("failed_to_resize", "image too small", "filtered_image"),
])
def test_reasons(status, message, reason):
    assert download.reason(status, message) == reason


@pytest.mark.slow
def test_download_part_from_local_server(demo_pool, tmp_path):
    root, _, meta = demo_pool
    work = str(tmp_path / "w")
    download.split_input(meta, work, 1000)
    part = download.read_parts(work)[0]
    images, rejects = str(tmp_path / "images.parquet"), str(tmp_path / "rej.parquet")
    info = download.download_part(part, str(tmp_path / "p0"), images, rejects,
                                  download.DownloadConfig(threads=8))
    truth = pl.read_parquet(f"{root}/truth.parquet")
    img = pl.read_parquet(images)
    rej = pl.read_parquet(rejects)
    good = set(truth.filter(~pl.col("kind").is_in(["dead_link", "corrupt"]))["uid"])
    assert set(img["uid"]) == good and img["uid"].is_sorted()
    assert img["jpg"].null_count() == 0
    from PIL import Image
    import io
    for row in img.head(20).iter_rows(named=True):
        assert Image.open(io.BytesIO(row["jpg"])).size == (row["width"], row["height"])
    fate = dict(rej.select("uid", "reason").iter_rows())
    for kind, reason in (("dead_link", "dead_link"), ("corrupt", "corrupt_image")):
        uids = set(truth.filter(pl.col("kind") == kind)["uid"])
        assert uids and {fate[u] for u in uids} == {reason}
    assert set(fate) | set(img["uid"]) == set(truth["uid"]) and len(fate) + len(img) == len(truth)
    assert (rej["stage"] == "download").all()
    assert info["images"] == len(img)
    # finished: a rerun reads the completion marker and runs nothing
    assert download.download_part(part, str(tmp_path / "p0"), images, rejects,
                                  download.DownloadConfig(threads=8)) == info
