"""luvc's task suite as a local lmms-eval task, to run the fidelity model through lmms-eval.

``write_task(folder, count)`` writes held-out items of ``luvc.fidelity.tasks``
as PNG files and ``items.jsonl`` (the format ``luvc bench fidelity --dataset``
reads, plus each image's absolute path) and a task YAML beside them;
``--include_path folder --tasks luvc_fidelity`` then scores exact-match
accuracy as the benchmark does. The functions below are what the YAML names
(lmms-eval imports them by module path); they need Pillow, not lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "luvc_fidelity"

YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function luvc.integrations.lmms_eval_task.doc_to_visual
doc_to_text: !function luvc.integrations.lmms_eval_task.doc_to_text
doc_to_target: answer
process_results: !function luvc.integrations.lmms_eval_task.process_results
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def write_task(folder: str | Path, count: int, split: str = "test") -> Path:
    """The first ``count`` items of ``split`` and the task YAML in ``folder``; returns the YAML's path."""
    from PIL import Image

    from luvc.fidelity.tasks import items

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, item in enumerate(items(split, count)):
        name = f"{split}-{number:04d}.png"
        Image.fromarray(item.image).save(folder / name)
        rows.append({"image": name, "path": str(folder / name), "question": item.question, "answer": item.answer,
                     "task": item.task})
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / f"{TASK}.yaml"
    path.write_text(YAML)
    return path


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["path"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first answer word-sequence, as ``luvc bench fidelity`` scores."""
    return {"exact_match": float(results[0].strip() == doc["answer"])}
