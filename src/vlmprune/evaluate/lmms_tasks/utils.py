"""The functions of vlmprune's lmms-eval tasks: the same question, image and exact-match scoring
(normalisation, choice letters) as `vlmprune evaluate`'s built-in tasks."""

from vlmprune.evaluate.tasks import match


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")] if doc.get("image") is not None else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(match(results[0], doc["answer"]))}
