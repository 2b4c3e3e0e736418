"""Rows that used to stop a run after it started are refused before step 1: a 0-byte
image, a truncated JPEG, a missing image, an image whose tokens end past max_length,
a text-only row in stage 1. The run trains on the rest and completes; every input row
is either trained on or listed in <stage>/rejects.parquet with its reason."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

import mllm_fixtures as fx
from flows.cli import main
from mllm import presets, train
from pipelines import manifest

from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train",
                      "tiny.yaml")
LONG = " ".join(["the shape sits on a plain background"] * 60)  # far past max_length 256


def caption(uid, image, value="a red square"):
    return {"id": uid, "source": "coreset", "image": image, "has_image": image is not None, "n_turns": 2,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                              {"from": "gpt", "value": value}]}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad-data"))
    images = fx.write_images(root, 16, "files")
    sub = os.path.join(root, images["path"], "sub")
    good = fx.jpeg("red", "square")
    with open(os.path.join(sub, "empty.jpg"), "wb"):
        pass
    with open(os.path.join(sub, "cut.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    stage1 = fx.stage1_rows(16)
    for r in stage1:
        r["image"] = f"sub/{r['image']}.jpg"
    stage1[3:3] = [caption("empty", "sub/empty.jpg"), caption("cut", "sub/cut.jpg"),
                   caption("missing", "sub/missing.jpg")]
    text_only = caption("text", None)
    text_only["conversations"][0]["value"] = "Describe a red square."
    stage1.append(text_only)
    mix = fx.mix_rows(12, 4, lambda uid: f"sub/{uid}.jpg")
    long = {"id": "long", "source": "llava", "image": "sub/img0001.jpg", "has_image": True, "n_turns": 4,
            "conversations": [{"from": "human", "value": "Describe the background."},
                              {"from": "gpt", "value": LONG},
                              {"from": "human", "value": "<image>\nWhat color is the shape?"},
                              {"from": "gpt", "value": "red."}]}
    mix[5:5] = [long, {**caption("cut2", "sub/cut.jpg"), "source": "llava"}]
    fx.write_table(stage1, os.path.join(root, "stage1.parquet"))
    fx.write_table(mix, os.path.join(root, "mix.parquet"))
    path = os.path.join(root, "manifest.json")
    manifest.write(path, tables={"stage1": os.path.join(root, "stage1.parquet"),
                                 "mix": os.path.join(root, "mix.parquet")},
                   images={"stage1": images, "mix": images})
    return path


def rejects(folder):
    return [(r["row"], r["id"], r["reason"]) for r in
            pq.read_table(os.path.join(folder, "rejects.parquet")).to_pylist()]


def test_bad_rows_are_refused_before_step_1_and_the_run_completes(bad_data, tmp_path):
    cfg = presets.tiny({"stage1.max_steps": None, "stage2.max_steps": None,  # one whole epoch each
                        "stage1.save_every": 100, "stage2.save_every": 100})
    summaries = train.run_stages(cfg, bad_data, str(tmp_path), progress=False)
    s1, s2 = summaries[1], summaries[2]
    assert rejects(tmp_path / "stage1") == [(3, "empty", "image_unreadable"), (4, "cut", "image_unreadable"),
                                            (5, "missing", "image_missing"), (19, "text", "no_image_in_stage1")]
    assert rejects(tmp_path / "stage2") == [(5, "long", "image_past_max_length"),
                                            (6, "cut2", "image_unreadable")]
    assert (s1["input_rows"], s1["trained_rows"], s1["rejected_rows"]) == (20, 16, 4)
    assert (s2["input_rows"], s2["trained_rows"], s2["rejected_rows"]) == (18, 16, 2)
    assert s1["rejects"] == {"image_missing": 1, "image_unreadable": 2, "no_image_in_stage1": 1}
    assert s2["rejects"] == {"image_past_max_length": 1, "image_unreadable": 1}
    # the whole epoch ran: every kept row was drawn at least once, none failed
    assert s1["steps"] == 2 and s2["steps"] == 3  # 16 / 8; ceil(12 / 8) + ceil(4 / 8)
    for stage, s in ((1, s1), (2, s2)):
        lines = open(tmp_path / f"stage{stage}" / "metrics.jsonl").read().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, s["steps"] + 1))
        with open(tmp_path / f"stage{stage}" / "summary.json") as f:
            assert json.load(f)["rejected_rows"] == s["rejected_rows"]
    detail = pq.read_table(tmp_path / "stage2" / "rejects.parquet").column("detail").to_pylist()[0]
    assert detail.startswith("the image tokens end at position ") and detail.endswith("past data.max_length 256")


def test_strict_stops_before_step_1_in_one_line(bad_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = main(["train", "--manifest", bad_data, "--config", CONFIG, "--output", out, "--stage", "1",
               "--set", "data.strict=true", "--set", "stage1.max_steps=2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("warren train: error: ") and "4 of 20 rows refused before step 1" in err
    assert "first: row 3 (id 'empty') image_unreadable: empty file (0 bytes)" in err
    assert sorted(os.listdir(os.path.join(out, "stage1"))) == ["rejects.parquet"]  # no step ran
    assert len(rejects(os.path.join(out, "stage1"))) == 4
