"""`warren export --format llava-hf` and the `hf/` folder after stage 2: transformers'
LlavaForConditionalGeneration and AutoProcessor load it as they are, and it computes
what Warren computes (same ids, pixels, logits and greedy tokens), for a SigLIP tower
(every patch) and a CLIP tower (CLS dropped). Models Llava cannot express are refused;
Warren loads such a folder back (`export.load`, `stage2.init_from`, `warren generate`)."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
import torch
from PIL import Image

import mllm_fixtures as fx
from flows.cli import main
from mllm import export, generate, lineage, llava_hf, presets, train
from mllm.data import ImageProcessor
from mllm.model import build_vlm
from mllm.templates import get as get_template
from mllm.tokenizer import IMAGE_TOKEN
from mllm_fixtures import cached_stage1, single_thread
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A trained tiny SigLIP model: stage 1 (cached) then 3 steps of stage 2, which
    writes final/ and hf/."""
    manifest_path, out = cached_stage1(tmp_path_factory)
    run = str(tmp_path_factory.mktemp("hf-run"))
    os.symlink(os.path.join(out, "stage1"), os.path.join(run, "stage1"))
    cfg = presets.tiny({"stage2.max_steps": 3})
    with single_thread():
        summary = train.train(cfg, manifest_path, run, stage=2, progress=False)
    return manifest_path, run, summary


def _tiny_export(root: str, arch: str, **model_changes) -> str:
    """A Warren export folder of a random tiny model with an `arch` tower."""
    torch.manual_seed(1)
    cfg = presets.tiny()
    model_cfg = dataclasses.replace(cfg.model, vision=dataclasses.replace(cfg.model.vision, arch=arch),
                                    **model_changes)
    tok = fx.local_tokenizer()
    vlm = build_vlm(model_cfg, tok.convert_tokens_to_ids(IMAGE_TOKEN), len(tok))
    folder = os.path.join(root, f"{arch}-final")
    export.save(vlm, tok, cfg, "bunny", folder, "pad", model_cfg=model_cfg)
    return folder


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """A tiny CLIP model exported through `warren export`."""
    root = str(tmp_path_factory.mktemp("clip"))
    final = _tiny_export(root, "clip")
    hf = os.path.join(root, "hf")
    assert main(["export", "--checkpoint", final, "--format", "llava-hf", "--output", hf]) == 0
    return final, hf


@pytest.fixture(params=["siglip", "clip"])
def pair(request, siglip_run, clip_export):
    if request.param == "siglip":
        _, run, summary = siglip_run
        return request.param, summary["final"], summary["hf"]
    return (request.param, *clip_export)


def square_image(size: int = 48) -> Image.Image:
    return Image.open(io.BytesIO(fx.jpeg("red", "circle"))).convert("RGB").resize((size, size))


def warren_ids(template, conversations, tok, n_image: int, add_generation_prompt: bool) -> list[int]:
    """The ids Warren trains on (or prompts with): the token-exact template engine."""
    return template.encode(conversations, tok, n_image, add_generation_prompt=add_generation_prompt)[0]


def test_stage2_writes_hf_beside_final_with_its_model_card(siglip_run):
    manifest_path, run, summary = siglip_run
    assert summary["hf"] == os.path.join(run, "stage2", "hf")
    files = set(os.listdir(summary["hf"]))
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "chat_template.jinja", llava_hf.META, "README.md", "lineage.json"} <= files
    config = json.load(open(os.path.join(summary["hf"], "config.json")))
    assert config["model_type"] == "llava"
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == -2
    assert config["image_seq_length"] == 16  # 32 px / 8 px patches, all kept
    assert "auto_map" not in config  # nothing that would need trust_remote_code
    # The card: both stages' manifest and table hashes, recipe and final metrics.
    card = open(os.path.join(summary["hf"], "README.md")).read()
    man = json.load(open(manifest_path))
    import hashlib
    assert hashlib.sha256(open(manifest_path, "rb").read()).hexdigest() in card
    for table in ("stage1", "mix"):
        assert f"| table sha256 | `{man['tables'][table]['sha256']}` |" in card
    doc = lineage.read(summary["hf"])
    assert doc["training"]["stage2"]["final_loss"] == round(summary["final_loss"], 4)
    assert doc["recipe"]["stage1"]["template"] == "plain" and doc["recipe"]["stage2"]["lora_r"] == 8
    assert doc["base"]["vision_tower"].startswith("random init (siglip, 2 layers x 32")
    assert doc["export"]["vision_feature_select_strategy"] == "full"
    assert lineage.read(summary["final"])["data"] == doc["data"]
    assert doc["data"]["stage2"]["trainer"] == {"input_rows": 16, "trained_rows": 16, "rejected_rows": 0,
                                                "rejects": {}}
    assert "| rows checked before step 1 | input 16, trained 16, rejected 0 |" in card


def test_clip_export_drops_cls(clip_export):
    config = json.load(open(os.path.join(clip_export[1], "config.json")))
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 16  # 17 CLIP tokens, CLS dropped


def test_llava_loads_and_matches_warren_logits_and_greedy_tokens(pair):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    arch, final, hf = pair
    loaded = export.load(final)
    vlm, tok = loaded.model, loaded.tokenizer
    llava = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf, backend="pil")
    image = square_image()
    messages = llava_hf.to_messages([{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}], image=image)
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")

    ids = generate.prompt_ids(loaded, QUESTION, with_image=True)
    conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}]
    assert enc["input_ids"][0].tolist() == warren_ids(loaded.template, conv, tok, vlm.num_image_tokens, True)
    assert enc["input_ids"][0].tolist() == ids
    assert int((enc["input_ids"] == vlm.image_token_id).sum()) == vlm.num_image_tokens == 16
    pixels = loaded.processor(image).unsqueeze(0)
    assert torch.equal(enc["pixel_values"], pixels)  # PIL backend: pixel-exact on a square image

    with torch.no_grad():
        theirs = llava(**enc).logits
        ours = vlm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=pixels).logits
    assert theirs.shape == ours.shape == (1, len(ids), vlm.language_model.config.vocab_size)
    assert float((theirs - ours).abs().max()) <= 1e-4

    new = 12
    out = llava.generate(**enc, max_new_tokens=new, do_sample=False)
    hf_tokens = out[0, enc["input_ids"].shape[1]:].tolist()
    with torch.no_grad():
        embeds = vlm.embed(enc["input_ids"], pixels)
        end_id = tok.convert_tokens_to_ids(loaded.template.end_token(tok))
        ours_tokens = vlm.language_model.generate(
            inputs_embeds=embeds, attention_mask=enc["attention_mask"], max_new_tokens=new,
            do_sample=False, eos_token_id=end_id, pad_token_id=tok.pad_token_id)[0].tolist()
    assert len(hf_tokens) >= 1 and hf_tokens == ours_tokens
    text = processor.decode(hf_tokens, skip_special_tokens=True).strip()
    assert text == generate.answer(loaded, image, QUESTION, max_new_tokens=new)


def test_default_torchvision_processor_is_within_one_grey_level(pair):
    """AutoProcessor's default backend (torchvision) resizes with its own bicubic: a pixel
    may differ by one grey level from PIL's; padding is the same mean colour."""
    from transformers import AutoProcessor
    arch, final, hf = pair
    loaded = export.load(final)
    processor = AutoProcessor.from_pretrained(hf)
    assert type(processor).__name__ == "LlavaProcessor"
    mean, std = loaded.model.vision.normalisation
    level = (1 / 255) / min(std) + 1e-6
    for size in ((48, 48), (48, 40), (30, 50)):
        image = square_image().resize(size)
        theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        assert float((theirs - loaded.processor(image)).abs().max()) <= level


def test_pil_processor_pads_non_square_images_as_warren_does(pair):
    """LLaVA's expand2square: pad to a square with int(mean * 255), centred; both sides."""
    from transformers import AutoProcessor
    arch, final, hf = pair
    loaded = export.load(final)
    processor = AutoProcessor.from_pretrained(hf, backend="pil")
    for size in ((48, 40), (30, 50), (64, 20)):
        image = square_image().resize(size)
        theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(theirs, loaded.processor(image))
    # The band is the mean colour exactly: (int(m * 255) / 255 - m) / s.
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    band = processor.image_processor(wide, return_tensors="pt")["pixel_values"][0][:, 0, 0]
    mean, std = loaded.model.vision.normalisation
    want = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(band, want, atol=1e-6)


CONVERSATIONS = [
    [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the shape?"}, {"from": "gpt", "value": "red."}],
    # image after the question: both move it to the front, as preprocess_multimodal does
    [{"from": "human", "value": f"What color is the shape?\n{IMAGE_TOKEN}"}, {"from": "gpt", "value": "red."}],
    [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": "a red circle."}],
    [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the shape?"}, {"from": "gpt", "value": "blue."},
     {"from": "human", "value": "And what shape is it?"}, {"from": "gpt", "value": "a square, on the left."}],
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello!"}],
]


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_chat_template_renders_and_tokenizes_the_training_template(siglip_run, k):
    from transformers import AutoProcessor
    _, run, summary = siglip_run
    loaded = export.load(summary["final"])
    processor = AutoProcessor.from_pretrained(summary["hf"], backend="pil")
    conv = CONVERSATIONS[k]
    has_image = IMAGE_TOKEN in conv[0]["value"]
    messages = llava_hf.to_messages(conv, image=square_image() if has_image else None)
    text = processor.apply_chat_template(messages)
    assert text == llava_hf.warren_text(loaded.template, conv, loaded.tokenizer)
    assert text.endswith("<|endoftext|>") and text.count("ASSISTANT:") == len(conv) // 2
    ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ids = ids[0] if isinstance(ids[0], list) else ids
    assert ids == warren_ids(loaded.template, conv, loaded.tokenizer, loaded.model.num_image_tokens, False)


def test_special_token_text_in_content_stays_text_with_sanitize_control_tokens(siglip_run):
    """Warren never turns content into special ids; apply_chat_template does unless told
    to sanitize control tokens (documented in docs/train.md)."""
    from transformers import AutoProcessor
    loaded = export.load(siglip_run[2]["final"])
    processor = AutoProcessor.from_pretrained(siglip_run[2]["hf"], backend="pil")
    conv = [{"from": "human", "value": "Write <|endoftext|> please."},
            {"from": "gpt", "value": "Here: <|endoftext|> done."}]
    messages = llava_hf.to_messages(conv)
    want = warren_ids(loaded.template, conv, loaded.tokenizer, loaded.model.num_image_tokens, False)
    eos = loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert want.count(eos) == 1  # only the template's own end token
    raw = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    raw = raw[0] if isinstance(raw[0], list) else raw
    assert raw.count(eos) == 3 and raw != want
    safe = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         sanitize_control_tokens=True)["input_ids"]
    assert (safe[0] if isinstance(safe[0], list) else safe) == want


def test_a_system_message_replaces_the_default_system_prompt(siglip_run):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(siglip_run[2]["hf"], backend="pil")
    text = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        add_generation_prompt=True)
    assert text == "Be brief. USER: Say hello. ASSISTANT:"


def test_warren_loads_the_hf_folder_back_weight_for_weight(siglip_run):
    _, run, summary = siglip_run
    ours = export.load(summary["final"])
    back = export.load(summary["hf"])
    assert back.meta["format"] == "llava-hf" and back.template.name == ours.template.name == "bunny"
    assert back.model.num_image_tokens == ours.model.num_image_tokens
    a, b = ours.model.state_dict(), back.model.state_dict()
    # Phi's lm_head bias (zero in a random model) has no place in Llava.
    assert set(a) - set(b) == {"language_model.lm_head.bias"}
    assert not a["language_model.lm_head.bias"].any()
    for name, tensor in b.items():
        assert torch.equal(tensor, a[name]), name
    assert back.tokenizer.get_vocab() == ours.tokenizer.get_vocab()


def test_generate_command_takes_the_hf_folder(siglip_run, tmp_path, capsys):
    _, run, summary = siglip_run
    image = tmp_path / "q.jpg"
    image.write_bytes(fx.jpeg("blue", "square"))
    args = ["--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "6"]
    assert main(["generate", "--checkpoint", summary["hf"], *args]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", "--checkpoint", summary["final"], *args]) == 0
    assert capsys.readouterr().out == from_hf


def test_stage2_init_from_an_hf_folder_trains_as_from_warrens_own(siglip_run, tmp_path):
    """The stage-1 model exported as llava-hf, then stage 2 from it: the same losses as
    stage 2 from stage 1's final/ (same weights, tokenizer, data and seeds)."""
    manifest_path, run, summary = siglip_run
    stage1_final = os.path.join(run, "stage1", "final")
    hf1 = str(tmp_path / "stage1-hf")
    assert main(["export", "--checkpoint", stage1_final, "--format", "llava-hf", "--output", hf1]) == 0
    cfg = presets.tiny({"stage2.max_steps": 2, "stage2.init_from": hf1, "stage2.save_every": 100})
    got = train.train(cfg, manifest_path, str(tmp_path / "from-hf"), stage=2, progress=False)
    with open(os.path.join(run, "stage2", "metrics.jsonl")) as f:
        want = [json.loads(line)["loss"] for line in f][:2]
    with open(os.path.join(got["output_dir"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(losses, want))
    assert os.path.isdir(got["hf"])  # and it exports again
    card = lineage.read(got["final"])
    assert card["recipe"]["stage2"]["init_from"] == hf1


def test_init_from_a_folder_that_is_no_model_is_refused(siglip_run, tmp_path):
    manifest_path = siglip_run[0]
    cfg = presets.tiny({"stage2.init_from": str(tmp_path)})
    from pipelines.errors import ConfigError
    with pytest.raises(ConfigError, match="not an exported model folder"):
        train.train(cfg, manifest_path, str(tmp_path / "x"), stage=2, progress=False)


@pytest.mark.parametrize("change,words", [
    ({"transforms": ["qk_norm", "post_attn_norm"]}, "stabilisers"),
    ({"projector": "resampler"}, "connector is 'resampler'"),
])
def test_tinygptv_models_refuse_the_format_in_one_line(tmp_path, capsys, change, words):
    final = _tiny_export(str(tmp_path), "siglip", **change)
    out = str(tmp_path / "hf")
    assert main(["export", "--checkpoint", final, "--format", "llava-hf", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot export as llava-hf" in err and words in err
    assert not os.path.exists(out)


def test_an_output_head_bias_is_refused_unless_dropped_and_then_recorded(tmp_path, capsys):
    final = _tiny_export(str(tmp_path), "siglip")
    loaded = export.load(final)
    with torch.no_grad():
        loaded.model.language_model.lm_head.bias.fill_(0.25)
    tmp = str(tmp_path / "biased")
    export.save(loaded.model, loaded.tokenizer, presets.tiny(), "bunny", tmp, model_cfg=loaded.model_cfg)
    out = str(tmp_path / "hf")
    assert main(["export", "--checkpoint", tmp, "--format", "llava-hf", "--output", out]) == 2
    assert "max |b| = 0.25" in capsys.readouterr().err
    assert main(["export", "--checkpoint", tmp, "--format", "llava-hf", "--output", out,
                 "--drop-head-bias"]) == 0
    assert json.load(open(os.path.join(out, llava_hf.META)))["head_bias_dropped"] == 0.25
    assert "| head_bias_dropped | 0.25 |" in open(os.path.join(out, "README.md")).read()


def test_export_refuses_an_output_holding_other_files(tmp_path, clip_export):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", "--checkpoint", clip_export[0], "--format", "llava-hf",
                 "--output", str(out)]) == 2
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--format", "llava-hf",
                 "--output", str(tmp_path / "o")]) == 2


def test_a_foreign_llava_folder_needs_a_template(clip_export, tmp_path):
    import shutil
    from pipelines.errors import InputError
    foreign = str(tmp_path / "foreign")
    shutil.copytree(clip_export[1], foreign)
    os.remove(os.path.join(foreign, llava_hf.META))
    with pytest.raises(InputError, match="name its conversation template"):
        export.load(foreign)
    loaded = export.load(foreign, template="bunny")
    assert loaded.template.name == "bunny" and loaded.model.vision.arch == "clip"
    assert loaded.processor.aspect == "pad"


def test_a_task_template_is_refused(tmp_path):
    tok = fx.local_tokenizer()
    with pytest.raises(llava_hf.NotExportable, match="task template"):
        llava_hf.chat_template(get_template("tinygptv"), tok)


def test_the_guide_snippet_runs_as_written(siglip_run, tmp_path, monkeypatch, capsys):
    import re
    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "train.md")).read()
    code = re.search(r"<!-- snippet: llava-hf -->\s*```python\n(.*?)```", guide, re.S).group(1)
    os.makedirs(tmp_path / "runs" / "tiny" / "stage2")
    os.symlink(siglip_run[2]["hf"], tmp_path / "runs" / "tiny" / "stage2" / "hf")
    (tmp_path / "photo.jpg").write_bytes(fx.jpeg("green", "square"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/train.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    loaded = export.load(siglip_run[2]["final"])
    assert printed == generate.answer(loaded, str(tmp_path / "photo.jpg"), "What is in the picture?",
                                      max_new_tokens=64)


def test_stage2_of_a_stabilised_model_skips_hf_and_says_why(siglip_run, tmp_path):
    manifest_path = siglip_run[0]
    cfg = presets.tiny({"model.transforms": ["qk_norm"], "stage1.max_steps": 1, "stage2.max_steps": 1,
                        "stage1.save_every": 1, "stage2.save_every": 1})
    out = str(tmp_path / "run")
    s = train.run_stages(cfg, manifest_path, out, progress=False)[2]
    assert "hf" not in s and not os.path.exists(os.path.join(out, "stage2", "hf"))
    assert s["hf_skipped"].startswith("cannot export as llava-hf: it uses TinyGPT-V's stabilisers (qk_norm)")
    assert json.load(open(os.path.join(out, "stage2", "summary.json")))["hf_skipped"] == s["hf_skipped"]
    assert os.path.exists(os.path.join(out, "stage2", "final", "README.md"))  # Warren's export keeps its card
