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
    assert info == {"parts": 3, "rows": 25, "missing_url": 2, "bad_url_scheme": 0,
                    "part_rows": [10, 10, 3]}
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


# -- URL schemes: only what the config allows is ever fetched ---------------------------------
def test_only_http_and_https_are_fetched_unless_the_config_adds_a_scheme(tmp_path):
    uids = [f"u{i}" for i in range(10)]
    urls = ["http://h/0.jpg", "HTTPS://h/1.jpg", " https://h/2.jpg ", "file:///etc/hostname",
            "ftp://h/4.jpg", "data:image/png;base64,AAAA", "javascript:alert(1)", "/etc/hostname",
            "s3://bucket/8.jpg", "http:/9.jpg"]
    info = download.split_input(_meta(tmp_path / "m.parquet", uids, urls), str(tmp_path / "w"), 100)
    assert info["missing_url"] == 0 and info["bad_url_scheme"] == 7 and info["part_rows"] == [3]
    part = pl.read_parquet(download.read_parts(str(tmp_path / "w"))[0])
    assert part["uid"].to_list() == ["u0", "u1", "u2"]
    rej = pl.read_parquet(tmp_path / "w" / "rejects" / "input.parquet").sort("uid")
    assert rej.rows() == [(u, "input", "bad_url_scheme", None) for u in
                          ["u3", "u4", "u5", "u6", "u7", "u8", "u9"]]
    # a config may allow more (img2dataset reads what fsspec/urllib can)
    info = download.split_input(_meta(tmp_path / "m2.parquet", uids, urls), str(tmp_path / "w2"), 100,
                                schemes=("http", "https", "s3"))
    assert info["bad_url_scheme"] == 6 and info["part_rows"] == [4]


def test_coreset_split_keeps_unfetchable_urls_out(tmp_path):
    t = pa.table({"uid": ["a", "b", "c", "d"], "url": ["http://h/a", "file:///etc/passwd", None, "https://h/d"],
                  "caption": ["x"] * 4})
    pq.write_table(t, tmp_path / "coreset.parquet")
    info = download.split_table(str(tmp_path / "coreset.parquet"), str(tmp_path / "w"), 1)
    assert info["parts"] == 2 and info["part_rows"] == [1, 1] and info["not_fetched"] == 2
    parts = [pl.read_parquet(p)["uid"].to_list() for p in download.read_parts(str(tmp_path / "w"))]
    assert parts == [["a"], ["d"]]
    rej = pl.read_parquet(tmp_path / "w" / "rejects" / "input.parquet").sort("uid")
    assert rej.rows() == [("b", "coreset_images", "bad_url_scheme", None),
                          ("c", "coreset_images", "missing_url", None)]


def test_download_config_schemes_are_checked():
    from pipelines.errors import ConfigError
    with pytest.raises(ConfigError, match="url_schemes must be scheme names"):
        download.DownloadConfig(url_schemes=("http", "no scheme"))
    with pytest.raises(ConfigError, match="url_schemes must be scheme names"):
        download.DownloadConfig(url_schemes=())


def test_nothing_downloaded_stops_with_the_first_error():
    split = {"rows": 12, "missing_url": 1, "bad_url_scheme": 1}
    infos = [{"rows": 5, "images": 0, "first_error": None},
             {"rows": 5, "images": 0, "first_error": "http://127.0.0.1:9/u5.jpg: <urlopen error "
                                                     "[Errno 111] Connection refused>"}]
    with pytest.raises(download.NothingDownloaded) as e:
        download.check_downloaded(split, infos)
    assert str(e.value) == ("0 of 10 downloads succeeded (first error: http://127.0.0.1:9/u5.jpg: "
                            "<urlopen error [Errno 111] Connection refused>); check that the image "
                            "server is reachable, then rerun the same command to resume")
    with pytest.raises(download.NothingDownloaded, match=r"none of the 12 metadata rows has a URL"):
        download.check_downloaded(split, [])
    download.check_downloaded(split, [{"rows": 5, "images": 1}])     # one image is enough


@pytest.mark.slow
def test_a_file_url_never_reaches_img2dataset(demo_pool, tmp_path):
    """file:///etc/hostname in the metadata: rejected at the split, never read."""
    root, base, _ = demo_pool
    secret = tmp_path / "secret.jpg"
    import shutil
    shutil.copy(f"{root}/images/demo000000.jpg", secret)   # a decodable image: it would be kept
    meta = _meta(tmp_path / "m.parquet", ["ok", "local", "etc"],
                 [f"{base}/images/demo000000.jpg", f"file://{secret}", "file:///etc/hostname"])
    work = str(tmp_path / "w")
    download.split_input(meta, work, 10)
    part = download.read_parts(work)[0]
    images, rejects = str(tmp_path / "images.parquet"), str(tmp_path / "rej.parquet")
    info = download.download_part(part, str(tmp_path / "p0"), images, rejects,
                                  download.DownloadConfig(threads=2))
    assert pl.read_parquet(images)["uid"].to_list() == ["ok"] and info["rows"] == 1
    rej = pl.read_parquet(f"{work}/rejects/input.parquet").sort("uid")
    assert rej.rows() == [("etc", "input", "bad_url_scheme", None), ("local", "input", "bad_url_scheme", None)]
