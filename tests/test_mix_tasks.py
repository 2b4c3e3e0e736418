"""The mix builder tags records by task (a source's `task`: a name, "auto", or none)."""
import json
import os

import polars as pl
import pytest

from pipelines import runkey
from pipelines.mix import tasks
from pipelines.errors import ConfigError
from pipelines.mix import build, recipe


def rec(rid, human, answer, image=True):
    o = {"id": rid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image:
        o["image"] = f"coco/{rid}.jpg"
    return o


# One source per `task` setting. The ids say what each record tests.
VQA = [
    rec("v-plain", "<image>\nWhat colour is the bus?", "Red."),
    rec("v-tagged", "<image>\n[vqa] How many dogs?", "Two."),             # already [vqa]: kept as is
    rec("v-conflict", "<image>\n[refer] the red bus", "{<1><2><30><40>}"),  # cannot become [vqa]
    rec("v-text", "What is two plus two?", "Four.", image=False),          # text-only: untagged
    rec("v-shared", "<image>\nIs it raining?", "No."),                     # repeated in `plain`
]
AUTO = [
    rec("a-vqa", "<image>\nWhat is on the table?", "A cup."),
    rec("a-refer", "<image>\nwhere is the cup?", "{<10><20><30><40>}"),
    rec("a-identify", "<image>\nwhat is in {<10><20><30><40>}", "A cup."),
    rec("a-caption", "<image>\nWrite a short caption for this photo.", "A cup on a table."),
    rec("a-grounding", "<image>\ndescribe it", "A <p>cup</p> {<10><20><30><40>} on a table."),
    rec("a-tagged", "<image>\n[detection] cup", "<p>cup</p> {<10><20><30><40>}"),
    rec("a-text", "Name a prime number.", "Seven.", image=False),
]
PLAIN = [
    rec("p-plain", "<image>\nWhat colour is the bus?", "Blue."),
    rec("p-tagged", "<image>\n[refer] the red bus", "{<1><2><30><40>}"),   # no task: left alone
    rec("p-text", "Say hi.", "Hi.", image=False),
    {**rec("p-shared", "<image>\nIs it raining?", "No."), "image": "coco/v-shared.jpg"},
]

FIRST = {   # the first human turn of every kept record, exactly
    "v-plain": "<image>\n[vqa] What colour is the bus?",
    "v-tagged": "<image>\n[vqa] How many dogs?",
    "v-text": "What is two plus two?",
    "v-shared": "<image>\n[vqa] Is it raining?",
    "a-vqa": "<image>\n[vqa] What is on the table?",
    "a-refer": "<image>\n[refer] where is the cup?",
    "a-identify": "<image>\n[identify] what is in {<10><20><30><40>}",
    "a-caption": "<image>\n[caption] Write a short caption for this photo.",
    "a-grounding": "<image>\n[grounding] describe it",
    "a-tagged": "<image>\n[detection] cup",
    "a-text": "Name a prime number.",
    "p-plain": "<image>\nWhat colour is the bus?",
    "p-tagged": "<image>\n[refer] the red bus",
    "p-text": "Say hi.",
}


def write_sources(d):
    for name, items in (("vqa.json", VQA), ("auto.json", AUTO), ("plain.json", PLAIN)):
        (d / name).write_text(json.dumps(items))


def doc(d, **over):
    sources = [{"name": "vqa-src", "path": str(d / "vqa.json"), "task": "vqa"},
               {"name": "auto-src", "path": str(d / "auto.json"), "task": "auto"},
               {"name": "plain", "path": str(d / "plain.json")}]
    for s in sources:
        s.update(over.get(s["name"], {}))
    return {"name": "tasks", "seed": 0, "dedup": "exact", "sources": sources}


def build_into(d, out, restart=False, **over):
    stats = build.run(recipe.from_dict(doc(d, **over)), str(out), restart_run=restart)
    return stats, pl.read_parquet(out / "mix.parquet"), pl.read_parquet(out / "rejects.parquet")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasksrc")
    write_sources(d)
    out = d / "out"
    return (d, out) + build_into(d, out)


def test_first_human_turns_are_tagged_exactly(built):
    _, _, _, mix, _ = built
    got = {r["id"]: r["conversations"][0]["value"] for r in mix.iter_rows(named=True)}
    assert got == FIRST
    # answers and later turns are never touched
    source = {o["id"]: o for o in VQA + AUTO + PLAIN}
    for r in mix.iter_rows(named=True):
        assert r["conversations"][1:] == source[r["id"]]["conversations"][1:]


def test_conflicting_tag_and_duplicate_are_rejected_with_reasons(built):
    _, _, stats, _, rej = built
    rows = {r["id"]: r for r in rej.iter_rows(named=True)}
    assert set(rows) == {"v-conflict", "p-shared"}
    assert rows["v-conflict"]["reason"] == "bad_task: turn is already tagged [refer], cannot tag it [vqa]"
    assert json.loads(rows["v-conflict"]["record"]) == VQA[2]           # raw text kept for inspection
    # dedup compares the text as read: the untagged copy in `plain` repeats v-shared,
    # which `vqa-src` tagged [vqa], and goes
    assert rows["p-shared"]["reason"] == "duplicate: same image and conversations as vqa-src:4 (id v-shared)"
    assert stats["reasons"] == {"bad_task": 1, "duplicate": 1}


def test_stats_count_tasks_per_source_and_input_is_kept_plus_rejected(built):
    _, _, stats, mix, rej = built
    src = stats["sources"]
    assert src["vqa-src"]["tasks"] == {"none": 1, "vqa": 3}
    assert src["auto-src"]["tasks"] == {"caption": 1, "detection": 1, "grounding": 1, "identify": 1,
                                        "none": 1, "refer": 1, "vqa": 1}
    assert "tasks" not in src["plain"]                                   # no `task`: not counted
    assert stats["tasks"] == {"caption": 1, "detection": 1, "grounding": 1, "identify": 1,
                              "none": 2, "refer": 1, "vqa": 4}
    for name, items in (("vqa-src", VQA), ("auto-src", AUTO), ("plain", PLAIN)):
        s = src[name]
        kept = mix.filter(pl.col("source") == name).height
        rejected = rej.filter(pl.col("source") == name).height
        assert s["input"] == len(items) == kept + rejected == s["kept"] + s["rejected"]
        assert sum(s.get("tasks", {"": kept}).values()) == kept
    saved = json.load(open(os.path.join(built[1], "stats.json")))
    assert saved["sources"] == src and saved["tasks"] == stats["tasks"]


def test_reruns_are_deterministic_and_a_changed_task_retags(built, tmp_path):
    d, out, stats, _, _ = built
    before = (out / "mix.parquet").read_bytes()
    again, _, _ = build_into(d, out)                                     # same folder: markers reused
    assert again["seconds"]["prepare"] == stats["seconds"]["prepare"]
    assert (out / "mix.parquet").read_bytes() == before
    _, fresh, _ = build_into(d, tmp_path / "fresh")                      # from scratch: same bytes
    assert (tmp_path / "fresh" / "mix.parquet").read_bytes() == before
    # the task is part of the prepared source's fingerprint: changing it is refused on a
    # plain rerun (the folder holds the other task's mix) and retags with --restart
    with pytest.raises(runkey.StaleRunError, match=r"its settings changed"):
        build_into(d, out, **{"vqa-src": {"task": "caption"}, "plain": {"task": "auto"}})
    s2, mix2, rej2 = build_into(d, out, restart=True, **{"vqa-src": {"task": "caption"}, "plain": {"task": "auto"}})
    first = {r["id"]: r["conversations"][0]["value"] for r in mix2.iter_rows(named=True)}
    assert first["v-plain"] == "<image>\n[caption] What colour is the bus?"
    assert first["p-plain"] == "<image>\n[vqa] What colour is the bus?"
    assert set(rej2["id"].to_list()) == {"v-tagged", "v-conflict", "p-shared"}
    assert s2["sources"]["plain"]["tasks"] == {"none": 1, "refer": 1, "vqa": 1}
    # and back: the original mix again
    build_into(d, out, restart=True)
    assert (out / "mix.parquet").read_bytes() == before


def test_count_stays_exact_with_untaggable_records(built, tmp_path):
    d = built[0]
    stats, mix, rej = build_into(d, tmp_path / "o", **{"vqa-src": {"count": 3}})
    assert mix.filter(pl.col("source") == "vqa-src").height == 3         # 4 taggable, 3 drawn
    codes = sorted(r.split(":")[0] for r in rej.filter(pl.col("source") == "vqa-src")["reason"].to_list())
    assert codes == ["bad_task", "sampled_out"]


def test_the_identifier_counts_toward_the_length_limit(tmp_path):
    text = "<image>\nWhat colour is the bus?"
    (tmp_path / "s.json").write_text(json.dumps([rec("x", text, "Red.")]))
    limit = len(text) + len("Red.")                                      # fits exactly untagged
    for task, kept in ((None, 1), ("vqa", 0)):
        r = recipe.from_dict({"name": "t", "limits": {"max_chars": limit},
                              "sources": [{"name": "s", "path": str(tmp_path / "s.json"), "task": task}]})
        stats = build.run(r, str(tmp_path / f"o-{task}"))
        assert stats["kept"] == kept and stats["input"] == 1
    rej = pl.read_parquet(tmp_path / "o-vqa" / "rejects.parquet")
    assert rej["reason"].to_list() == [f"too_long: {limit + 6} characters with the task identifier (limit {limit})"]


def test_recipe_task_is_validated_with_the_known_tasks():
    with pytest.raises(ConfigError) as e:
        recipe.from_dict({"name": "t", "sources": [{"name": "a", "path": "a.json", "task": "ocr"},
                                                    {"name": "b", "path": "b.json", "task": ["vqa"]}]})
    msg = str(e.value)
    assert "source a: task must be auto, null or one of the known tasks " \
           "vqa, caption, refer, grounding, identify, detection (got 'ocr')" in msg
    assert "sources[1].task: expected a string or null, got ['vqa']" in msg   # both problems, one error
    for t in (None, "auto") + tasks.TASKS:
        assert recipe.from_dict({"name": "t", "sources": [{"name": "a", "path": "a", "task": t}]}).sources[0].task == t


def test_the_builder_hook_leaves_text_only_records_untagged_for_any_task():
    text = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]
    for task in (None, "auto") + tasks.TASKS:
        assert tasks.tag(text, False, "s", task) == text
    image = [{"from": "human", "value": "<image>\nName a colour."}, {"from": "gpt", "value": "Red."}]
    assert tasks.tag(image, True, "s", "caption")[0]["value"] == "<image>\n[caption] Name a colour."
