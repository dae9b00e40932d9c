"""The Qwen3 recipes (configs/recipes/*.yaml) pass `asyncopd config check`, say what a real
model needs (no newline stop, bf16, lengths that fit, the chat template and the math grader, the
paper's estimator), and each one's chart value set (charts/asyncopd/values-<recipe>.yaml)
renders a ConfigMap that is the same run: every field equal except those the chart sets for
the cluster and the paths of models and data inside the pods."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncopd.cli import main as cli_main
from asyncopd.config import RunConfig, load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml"))
# Keys the chart's ConfigMap overlay sets for the cluster (templates/configmap.yaml).
CHART_SET = {
    "output_dir": None,
    "endpoints": None,
    "redis": None,
    "tls": None,
    "autoscaler": None,
    "weightsync": ("store_port", "advertise_host"),
    "cache": ("server",),
    "rollout": ("server",),
    "teacher": ("server",),
    "learner": ("server", "checkpoint_dir", "resume"),
}


def test_there_are_the_two_paper_recipes() -> None:
    assert RECIPES == ["qwen3-1.7b-from-qwen3-8b", "qwen3-4b-from-qwen3-30b-a3b"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_check_passes(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "check", "-c", str(ROOT / "configs/recipes" / f"{recipe}.yaml")]) == 0
    assert "config OK" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_says_what_a_real_model_needs(recipe: str) -> None:
    config = load_config(str(ROOT / "configs/recipes" / f"{recipe}.yaml"), environ=False)
    assert config.name == recipe
    assert config.models.student.startswith("Qwen/Qwen3-") and config.models.teacher.startswith("Qwen/Qwen3-")
    assert config.models.dtype == "bfloat16"
    sampling = config.rollout.sampling
    assert sampling.stop == [], "a Qwen3 response must not be cut at its first newline"
    assert sampling.max_tokens >= 4096, "Qwen3 reasoning traces run to thousands of tokens"
    assert config.rollout.max_model_len is not None and config.rollout.max_model_len >= sampling.max_tokens + 1024
    assert config.task.chat_template and config.task.grader == "math"
    assert "\\boxed{}" in config.task.prompt_template.format(question="Q"), "the prompt asks for the graded form"
    assert (config.loss.kind, config.loss.advantage, config.loss.correction) == ("reverse_kl_mc", "recompute", "is")
    assert config.rollout.engine == "vllm" and config.rollout.vllm.dtype == "bfloat16"
    for device in (config.rollout.device, config.teacher.device, config.learner.device):
        assert device == "cuda"
    assert config.learner.checkpoint_every > 0 and config.learner.eval_every == 0
    assert config.max_staleness > 0, "the async setting"


def _helm() -> str:
    found = shutil.which("helm") or (str(ROOT / ".tools/helm/helm") if (ROOT / ".tools/helm/helm").exists() else None)
    if found is None:
        import os

        if os.environ.get("CI"):
            pytest.fail("helm is missing in CI: `make chart` (deploy/dev/chart-check.sh) installs it")
        pytest.skip("helm not installed (run deploy/dev/chart-check.sh)")
    return found


def _render(values: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_helm(), "template", "rel", str(ROOT / "charts/asyncopd"), "--namespace", "ns", "-f", str(values)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _without_chart_keys(config: RunConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for section, fields in CHART_SET.items():
        if fields is None:
            data.pop(section)
        else:
            for field in fields:
                data[section].pop(field)
    return data


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_chart_value_set_is_the_same_run(recipe: str, tmp_path: Path) -> None:
    local = load_config(str(ROOT / "configs/recipes" / f"{recipe}.yaml"), environ=False)
    values_path = ROOT / "charts/asyncopd" / f"values-{recipe}.yaml"
    values = yaml.safe_load(values_path.read_text())
    docs = _render(values_path)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-asyncopd-config")
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    chart = load_config(str(path), environ=False)

    # Inside the pods the models come from the model cache, the data from the datasets volume.
    assert chart.models.student == f"/models/{local.models.student}"
    assert chart.models.teacher == f"/models/{local.models.teacher}"
    assert {m["repo"] for m in values["modelCache"]["models"]} == {local.models.student, local.models.teacher}
    assert chart.task.source == "/data/" + str(local.task.source).split("/")[-1]
    expected = _without_chart_keys(local)
    expected["models"].update(student=chart.models.student, teacher=chart.models.teacher)
    expected["task"]["source"] = chart.task.source
    assert _without_chart_keys(chart) == expected

    # One GPU per pod, as many pods as the recipe's replicas (plus the one learner).
    gpus = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            component = d["metadata"]["labels"]["app.kubernetes.io/component"]
            limits = d["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
            gpus[component] = (d["spec"].get("replicas", 1), int(limits.get("nvidia.com/gpu", 0)))
    assert gpus["rollout"] == (local.rollout.replicas, 1)
    assert gpus["teacher"] == (local.teacher.replicas, 1)
    assert gpus["learner"] == (1, 1)
    assert gpus["cache"][1] == 0
