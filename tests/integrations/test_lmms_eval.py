"""lmms-eval runs luvc's models end to end (needs ``luvc[eval]``; skipped without lmms-eval).

The shipped fidelity model, saved as an ordinary transformers checkpoint, is
scored by ``python -m lmms_eval`` on luvc's task suite written as a local task,
uncompressed (``schedule=identity``) and with ``luvc-default``; the results
file must name the schedule and the measured visual tokens per layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is in the eval extra: pip install -e '.[eval]'")

from luvc.integrations.lmms_eval_task import TASK, write_task  # noqa: E402

COUNT = 30


def test_lmms_eval_lists_luvcs_models():
    from lmms_eval.models import get_model

    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.value.startswith("luvc.")]
    names = {manifest.model_id for manifest in point.load()()}
    assert names == {"luvc_qwen2_vl", "luvc_qwen2_5_vl"}
    assert get_model("luvc_qwen2_vl").__name__ == "LuvcQwen2VL"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from transformers import AutoProcessor

    from luvc.fidelity.model import CHECKPOINT, load_model

    folder = tmp_path_factory.mktemp("fidelity-model")
    load_model().save_pretrained(folder)
    AutoProcessor.from_pretrained(CHECKPOINT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task"), COUNT).parent


def _run(checkpoint: Path, task: Path, schedule: str, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "lmms_eval", "--model", "luvc_qwen2_vl",
            "--model_args", f"pretrained={checkpoint},schedule={schedule},device=cpu,device_map=cpu",
            "--tasks", TASK, "--include_path", str(task), "--limit", str(COUNT), "--batch_size", "10",
            "--output_path", str(out)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_lmms_eval_scores_identity_and_luvc_default(checkpoint, task, tmp_path):
    identity = _run(checkpoint, task, "identity", tmp_path / "identity")
    default = _run(checkpoint, task, "luvc-default", tmp_path / "default")
    for results, schedule in ((identity, "identity"), (default, "luvc-default")):
        assert f"schedule={schedule}" in results["config"]["model_args"]
        assert results["throughput"]["avg_luvc_prefills"] == COUNT / 10
    # 256 patches enter every layer uncompressed; luvc-default keeps 91.875 per layer on the fidelity model
    # (luvc bench fidelity measures the same).
    assert identity["throughput"]["avg_luvc_visual_tokens_per_layer"] == 256
    assert default["throughput"]["avg_luvc_visual_tokens_per_layer"] == pytest.approx(91.875)
    accuracy = {name: r["results"][TASK]["exact_match,none"] for name, r in (("identity", identity),
                                                                             ("default", default))}
    # The benchmark scores these 30 items 96.7% uncompressed and 56.7% with luvc-default; lmms-eval sends
    # images as JPEG, which may cost an item or two.
    assert accuracy["identity"] >= 0.85
    assert 0.4 <= accuracy["default"] < accuracy["identity"]
