"""VQAv2 val (local), with the VQA accuracy of LLaVA's m4c_evaluator.py.

test-dev / test are scored only by the EvalAI server (LLaVA's vqav2.sh writes an upload
file); Warren scores the val split, whose annotations are public.

Layout (playground/data/eval/vqav2/, the official release files):
    v2_OpenEnded_mscoco_val2014_questions.json   {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "answers": [{"answer"}, x10]}]}
    val2014/COCO_val2014_<image_id:012d>.jpg

Prompt: question + "\\n" + "Answer the question using a single word or phrase." (as in
LLaVA's llava_vqav2_mscoco_test-dev2015.jsonl). Missing answers: the VQA API refuses
results that do not cover every question; so does Warren.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks import vqa_accuracy
from mllm.eval.benchmarks.base import SHORT, Base, InputError, Item, Result, field, read_json
from mllm.eval.types import Question, register

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


@register("vqav2")
class VQAv2(Base):
    headline = "accuracy"
    folders = ("vqav2",)
    markers = (QUESTIONS,)
    missing = "error"
    hint = ("VQAv2 test-dev is scored only by the EvalAI server; Warren scores val (the "
            "official val2014 questions and annotations files)")
    missing_why = "the VQA API's loadRes refuses results that miss a question"

    def items(self, root: str) -> list[Item]:
        qpath, apath = os.path.join(root, QUESTIONS), os.path.join(root, ANNOTATIONS)
        qs, anns = read_json(qpath), read_json(apath)
        if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
            raise InputError("expected {\"questions\": [...]}", path=qpath)
        if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
            raise InputError("expected {\"annotations\": [...]}", path=apath)
        humans = {}
        for i, a in enumerate(anns["annotations"]):
            where = f"annotations[{i}]"
            qid = field(a, "question_id", apath, where, int)
            answers = [field(h, "answer", apath, f"{where}.answers", str)
                       for h in field(a, "answers", apath, where, list)]
            if len(answers) != 10:
                raise InputError(f"{where}: {len(answers)} answers; VQA accuracy needs 10", path=apath)
            humans[qid] = answers
        items = []
        for i, q in enumerate(qs["questions"]):
            where = f"questions[{i}]"
            qid = field(q, "question_id", qpath, where, int)
            image_id = field(q, "image_id", qpath, where, int)
            if qid not in humans:
                raise InputError(f"{where}: question {qid} has no annotation in {ANNOTATIONS}",
                                 path=qpath)
            prompt = field(q, "question", qpath, where, str) + "\n" + SHORT
            items.append(Item(Question(qid, prompt, os.path.join(
                root, "val2014", f"COCO_val2014_{image_id:012d}.jpg"), {}, 128), gold=humans[qid]))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        credits = {it.qid: vqa_accuracy.credit(texts[it.qid], it.gold) for it in items}
        accuracy = 100. * vqa_accuracy.mean(list(credits.values())) if credits else None
        return Result(len(credits), {"accuracy": accuracy}, credits)
