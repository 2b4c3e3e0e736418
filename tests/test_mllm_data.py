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
    # in a dataset: the error names the table, row and id
    ds = dataset(fx.cached_dataset(tmp_path_factory), max_length=40)
    with pytest.raises(InputError, match=r"mix.parquet row 0 \(id 'mix-img0000'\)"):
        ds[0]
    text_only = ds[len(ds) - 1]
    assert len(text_only.input_ids) <= 40


def test_malformed_rows_are_refused_naming_the_row(tmp_path):
    rows = fx.mix_rows(3, 1)
    rows[2]["conversations"] = [{"from": "human", "value": "<image>\nq"},
                                {"from": "human", "value": "again"}]
    fx.write_table(rows, str(tmp_path / "mix.parquet"))
    images = fx.write_images(str(tmp_path), 3)
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")},
                   images={"mix": images})
    with pytest.raises(InputError) as e:
        dataset(str(tmp_path / "manifest.json"))
    assert "row 2" in str(e.value) and "mix-img0002" in str(e.value)
    assert "turn 1 is from 'human', expected 'gpt'" in str(e.value)


def test_image_rows_need_an_image_source(tmp_path):
    fx.write_table(fx.mix_rows(2, 0), str(tmp_path / "mix.parquet"))
    manifest.write(str(tmp_path / "manifest.json"), {"mix": str(tmp_path / "mix.parquet")})
    with pytest.raises(InputError, match="manifest lists no images"):
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
