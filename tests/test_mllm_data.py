"""Manifest -> tables -> samples: image layouts, validation, truncation, batching."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

import mllm_fixtures as fx
from mllm import data, templates
from mllm.sampler import GlobalBatchSampler, RankBatches, micro_batches
from pipelines import manifest, schemas, storage
from pipelines.errors import InputError, ManifestError
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMG = 16


def dataset(manifest_path, table="mix", template="bunny", max_length=256):
    man = manifest.load(manifest_path)
    return data.ConversationDataset(
        man.table_path(table), data.image_store(man.images(table)), fx.local_tokenizer(),
        templates.get(template), N_IMG, data.ImageProcessor(32, (0.5,) * 3, (0.5,) * 3), max_length)


def test_three_image_layouts_give_the_same_pixels(tmp_path_factory):
    sets = {kind: dataset(fx.cached_dataset(tmp_path_factory, kind)) for kind in
            ("parquet", "files", "webdataset")}
    for row in (0, 5):
        pixels = [ds[row].pixel_values for ds in sets.values()]
        assert pixels[0].shape == (3, 32, 32)
        assert all(torch.equal(pixels[0], p) for p in pixels[1:])
    ds = sets["parquet"]
    assert ds[len(ds) - 1].pixel_values is None  # text-only rows come last in the fixture
    assert ds.has_image.sum() == 12 and (~ds.has_image).sum() == 4


def test_image_processor_pads_to_square_with_the_mean_colour():
    from PIL import Image
    proc = data.ImageProcessor(8, (0.5,) * 3, (0.5,) * 3, aspect="pad")
    wide = Image.new("RGB", (16, 8), (255, 255, 255))
    x = proc(wide)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, 4, 4], torch.ones(3))  # white centre
    assert x[:, 0, 4].abs().max() < 0.05  # padded band = mean colour = 0 after normalising
    assert data.ImageProcessor(8, (0.5,) * 3, (0.5,) * 3, aspect="resize")(wide)[:, 0, 4].min() > 0.9


def test_files_layout_refuses_paths_outside_its_root(tmp_path):
    store = data.FileImages(str(tmp_path))
    with pytest.raises(InputError, match="leaves the image root"):
        store.read("../secret.jpg")


def test_samples_are_masked_and_expanded(tmp_path_factory):
    ds = dataset(fx.cached_dataset(tmp_path_factory))
    tok = fx.local_tokenizer()
    s = ds[2]  # a multi-turn image row in the fixture
    image_id = tok.convert_tokens_to_ids("<image>")
    assert s.input_ids.count(image_id) == N_IMG
    trained = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != -100])
    assert trained == " green.<|endoftext|> a square.<|endoftext|>"


def test_truncation_cuts_text_but_never_image_tokens(tmp_path_factory):
    tok = fx.local_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = [1, 2] + [image_id] * 4 + list(range(10, 20))
    labels = [-100] * 6 + list(range(10, 20))
    cut_ids, cut_labels, cut = data.truncate(ids, labels, 8, image_id)
    assert cut and cut_ids == ids[:8] and cut_labels == labels[:8]
    assert data.truncate(ids, labels, 16, image_id) == (ids, labels, False)
    with pytest.raises(InputError, match="image tokens end at position 6"):
        data.truncate(ids, labels, 5, image_id)
    # in a dataset, a row whose image cannot fit is refused before training, never cut;
    # stage-1 rows ('plain'): the image (16 tokens), then the caption and "\n"
    path = fx.cached_dataset(tmp_path_factory)
    short = dataset(path, table="stage1", template="plain", max_length=15)
    assert len(short) == 0 and len(short.rejects) == 16
    assert {(r.reason, r.detail) for r in short.rejects} == {
        ("image_past_max_length", "the image tokens end at position 16, past data.max_length 15")}
    exact = dataset(path, table="stage1", template="plain", max_length=16)  # no caption token left
    assert {r.reason for r in exact.rejects} == {"nothing_to_train"} and len(exact.rejects) == 16
    cut = dataset(path, table="stage1", template="plain", max_length=18)
    assert len(cut) == 16 and not cut.rejects and set(cut.lengths.tolist()) == {18}
    s = cut[0]
    assert s.truncated and len(s.input_ids) == 18 and s.input_ids[:16] == [image_id] * 16


def test_malformed_rows_become_rejects_naming_the_row(tmp_path):
    rows = fx.mix_rows(3, 1)
    rows[2]["conversations"] = [{"from": "human", "value": "<image>\nq"},
                                {"from": "human", "value": "again"}]
    rows[1]["image"] = None  # has_image true, no reference
    fx.write_table(rows, str(tmp_path / "mix.parquet"))
    images = fx.write_images(str(tmp_path), 3)
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")},
                   images={"mix": images})
    ds = dataset(str(tmp_path / "manifest.json"))
    assert [(r.row, r.id, r.reason, r.detail) for r in ds.rejects] == [
        (1, "mix-img0001", "image_missing", "has_image is true but image is empty"),
        (2, "mix-img0002", "bad_conversation", "turn 1 is from 'human', expected 'gpt'")]
    assert ds.rows.tolist() == [0, 3] and len(ds) == 2 and ds.has_image.tolist() == [True, False]
    table = ds.reject_table("mix")
    assert table.schema == schemas.TRAIN_REJECTS
    assert table.column("row").to_pylist() == [1, 2] and table.column("uid").to_pylist() == [None, None]
    assert ds.reject_counts() == {"bad_conversation": 1, "image_missing": 1}
    # samples map to their table rows
    assert ds[1].pixel_values is None and ds[0].pixel_values.shape == (3, 32, 32)


def test_stage1_refuses_text_only_rows(tmp_path_factory):
    ds = dataset(fx.cached_dataset(tmp_path_factory), template="bunny")
    man = manifest.load(fx.cached_dataset(tmp_path_factory))
    s1 = data.ConversationDataset(
        man.table_path("mix"), data.image_store(man.images("mix")), fx.local_tokenizer(),
        templates.get("bunny"), N_IMG, data.ImageProcessor(32, (0.5,) * 3, (0.5,) * 3), 256,
        require_image=True)
    text_rows = [k for k in range(len(ds)) if not ds.has_image[k]]
    assert len(text_rows) == 4 and len(s1) == len(ds) - 4 and s1.has_image.all()
    assert [(r.row, r.reason) for r in s1.rejects] == [(k, "no_image_in_stage1") for k in text_rows]


def test_exact_lengths_are_the_sample_lengths(tmp_path_factory):
    ds = dataset(fx.cached_dataset(tmp_path_factory))
    assert ds.lengths.tolist() == [len(ds[k].input_ids) for k in range(len(ds))]


def test_image_rows_need_an_image_source(tmp_path):
    fx.write_table(fx.mix_rows(2, 0), str(tmp_path / "mix.parquet"))
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")})
    with pytest.raises(InputError, match="2 image rows, but the manifest lists no images"):
        dataset(str(tmp_path / "manifest.json"))


def test_a_manifest_whose_hashes_do_not_match_is_refused(tmp_path):
    from mllm import presets, train
    path = fx.make_dataset(str(tmp_path / "data"), n_stage1=8, n_image=4, n_text=2)
    # change the stage-1 table after the manifest was written
    rows = fx.stage1_rows(8)
    rows[0]["conversations"][1]["value"] = "a tampered caption"
    fx.write_table(rows, str(tmp_path / "data" / "stage1.parquet"))
    with pytest.raises(ManifestError, match=r"table 'stage1' .* does not match its sha256"):
        train.train(presets.tiny({"stage1.max_steps": 1}), path, str(tmp_path / "run"), stage=1,
                    progress=False)
    assert not os.path.exists(tmp_path / "run" / "stage1" / "checkpoints")
    # and through the command line: one clear line, exit code 2
    from flows.cli import main
    rc = main(["train", "--manifest", path, "--config", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train", "tiny.yaml"),
        "--output", str(tmp_path / "run2"), "--no-progress"])
    assert rc == 2


def test_missing_table_is_named(tmp_path):
    fx.write_table(fx.mix_rows(0, 2), str(tmp_path / "mix.parquet"))
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")})
    with pytest.raises(ManifestError, match="no table 'stage1'"):
        manifest.load(str(tmp_path / "manifest.json")).table_path("stage1")


def test_collator_pads_right_and_stacks_images_in_order():
    a = data.Sample([1, 2, 3], [-100, 2, 3], torch.zeros(3, 4, 4), False)
    b = data.Sample([4], [4], None, False)
    c = data.Sample([5, 6], [-100, 6], torch.ones(3, 4, 4), False)
    batch = data.Collator(pad_id=0)([a, b, c])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100], [-100, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][1].min() == 1


# ------------------------------------------------------------------------ sampler

def make_sampler(n_img=37, n_txt=13, g=8, **kw):
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(50, 300, n_img), rng.integers(5, 100, n_txt)])
    has_image = np.array([True] * n_img + [False] * n_txt)
    return GlobalBatchSampler(lengths, has_image, g, seed=3, **kw), lengths, has_image


def test_sampler_covers_every_sample_each_epoch_and_is_seeded():
    s, _, _ = make_sampler(group_by_modality_length=False)
    for epoch in (0, 1):
        batches = s.epoch(epoch)
        assert len(batches) == s.steps_per_epoch == 7
        flat = np.concatenate(batches)
        assert set(flat.tolist()) == set(range(50)) and len(flat) == 56  # wrap-around fill
    again = make_sampler(group_by_modality_length=False)[0]
    assert [b.tolist() for b in s.epoch(0)] == [b.tolist() for b in again.epoch(0)]
    assert [b.tolist() for b in s.epoch(0)] != [b.tolist() for b in s.epoch(1)]


def test_global_batches_hold_one_modality():
    s, lengths, has_image = make_sampler(megabatch=2)
    batches = s.epoch(0)
    assert len(batches) == s.steps_per_epoch == 5 + 2  # ceil(37/8) + ceil(13/8)
    assert all(len(set(has_image[gb].tolist())) == 1 for gb in batches)
    assert set(np.concatenate(batches).tolist()) == set(range(50))
    # within a megabatch, batches are sorted by length: less padding than random order
    grouped = sum(lengths[mb].max() * len(mb) for gb in s.epoch(0) for mb in micro_batches(gb, 4, 1, 0))
    r, _, _ = make_sampler(group_by_modality_length=False)
    plain = sum(lengths[mb].max() * len(mb) for gb in r.epoch(0) for mb in micro_batches(gb, 4, 1, 0))
    assert grouped < plain


def test_ranks_get_disjoint_shards_that_match_single_process_accumulation():
    s, _, _ = make_sampler()
    one = list(RankBatches(s, 2, 1, 0, 0, 10))  # 1 process, accumulation 4
    ranks = [list(RankBatches(s, 2, 2, r, 0, 10)) for r in range(2)]  # 2 processes, accum 2
    assert len(ranks[0]) == len(ranks[1]) == 20 and len(one) == 40
    for step in range(10):
        m = one[4 * step:4 * step + 4]  # micro-batches m0..m3 of the global batch
        # rank r takes micro-batches a * world + r: disjoint slices of the same global batch
        assert ranks[0][2 * step:2 * step + 2] == [m[0], m[2]]
        assert ranks[1][2 * step:2 * step + 2] == [m[1], m[3]]
        assert sum(m, []) == s.global_batch(step).tolist()
    # resuming at step 6 yields exactly the tail
    assert list(RankBatches(s, 2, 1, 0, 6, 10)) == one[24:]


# ------------------------------------------------------------------ image checks

def _png() -> bytes:
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _broken_images() -> dict[str, bytes]:
    good = fx.jpeg("red", "square")
    png = _png()
    return {"good": good, "png": png, "trailer": good + b"MOTIONPHOTO" * 20,  # data after EOI
            "empty": b"", "cut": good[: len(good) // 2], "noise": b"not an image at all" * 10,
            "cut_png": png[:-20]}


WANT = {"good": None, "png": None, "trailer": None, "empty": "image_unreadable",
        "cut": "image_unreadable", "noise": "image_unreadable", "cut_png": "image_unreadable",
        "absent": "image_missing"}


@pytest.mark.parametrize("kind", ["parquet", "files", "webdataset"])
def test_image_checks_find_missing_empty_and_truncated_images(tmp_path, kind):
    import io
    import tarfile
    items = _broken_images()
    if kind == "parquet":
        path = str(tmp_path / "images.parquet")
        storage.write_table(pa.table({"uid": list(items), "jpg": list(items.values()),
                                      "width": [1] * len(items), "height": [1] * len(items)}),
                            path, schemas.IMAGES)
        store, refs = data.ParquetImages(path), {k: k for k in WANT}
    elif kind == "files":
        for name, b in items.items():
            (tmp_path / f"{name}.jpg").write_bytes(b)
        store, refs = data.FileImages(str(tmp_path)), {k: f"{k}.jpg" for k in WANT}
    else:
        with tarfile.open(tmp_path / "00000.tar", "w") as tar:
            for name, b in items.items():
                info = tarfile.TarInfo(f"{name}.jpg")
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
        store, refs = data.WebDatasetImages(str(tmp_path)), {k: k for k in WANT}
    got = {name: store.probe(ref) for name, ref in refs.items()}
    assert {name: p[0] if p else None for name, p in got.items()} == WANT
    assert got["empty"][1] == "empty file (0 bytes)"
    assert "truncated" in got["cut"][1].lower()
    if kind == "files":
        assert store.probe("../escape.jpg")[0] == "image_missing"


def test_rejects_carry_the_tables_uid(tmp_path):
    """A mix table with a `uid` column (source:row) names it in the rejects."""
    rows = fx.mix_rows(3, 1)
    rows[0]["conversations"][1]["value"] = " "
    for k, row in enumerate(rows):
        row["uid"] = f"llava:{k}"
    table = pa.Table.from_pylist(rows, schema=schemas.MIX)
    storage.write_table(table, str(tmp_path / "mix.parquet"))
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")},
                   images={"mix": fx.write_images(str(tmp_path), 3)})
    ds = dataset(str(tmp_path / "manifest.json"))
    assert [(r.row, r.uid, r.reason, r.detail) for r in ds.rejects] == [
        (0, "llava:0", "bad_conversation", "turn 1 is empty")]
    assert ds.reject_table("mix").column("uid").to_pylist() == ["llava:0"]
