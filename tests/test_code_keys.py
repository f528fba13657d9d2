"""What a step's key covers: each kind of change rebuilds exactly the steps it reaches, and `itune status` says why.

The pipeline runs on a copy of the project, so its modules can be edited as a developer edits them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from catalog.keys import module_hashes, rebuild_reasons
from tests.conftest import REPO, tiny_overrides

PACKAGES = ("catalog", "commands", "data_checks", "deployments", "flows", "tasks", "toolkit", "configs")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with a pipeline built up to fine-tune on a small JSONL source."""
    base = tmp_path_factory.mktemp("project")
    code = base / "code"
    for name in PACKAGES:
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    source = base / "data.jsonl"
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in
            ("apple", "river", "stone", "cloud", "green", "house", "queen", "music", "light", "horse") * 8]
    source.write_text("".join(json.dumps({**r, "output": f"{r['output']} {i}"}) + "\n" for i, r in enumerate(rows)))
    overrides = tiny_overrides(base / "artifacts", **{"data.source": str(source), "validate.min_rows": 5,
                                                      "template.val_fraction": 0.2, "template.test_fraction": 0.2})
    project = {"code": code, "home": base / "prefect", "source": source, "overrides": overrides}
    result = _itune(project, "run", "--until", "finetune")
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def _itune(project, *args, extra=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(project["home"]), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "commands.app", *args]
    for override in [*project["overrides"], *extra]:
        command += ["--set", override]
    return subprocess.run(command, cwd=project["code"], env=env, capture_output=True, text=True, timeout=600)


def _status(project, extra=()):
    result = _itune(project, "status", "--until", "finetune", "--json", extra=extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["steps"]


@contextlib.contextmanager
def _edited(path, change):
    """Apply `change` to a file's text for the duration, then put the original back."""
    original = path.read_text()
    try:
        path.write_text(change(original))
        yield
    finally:
        path.write_text(original)


def _rebuilt(steps):
    return [step for step, info in steps.items() if info["state"] != "Cached"]


def test_status_after_a_build_is_all_cached(project):
    assert _rebuilt(_status(project)) == []


def test_comment_and_docstring_edits_to_a_shared_module_keep_everything_cached(project):
    def reword(text):
        reworded = text.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n", 1)
        return reworded.replace("\ndef ", "\n# a new comment\ndef ", 1) + "\n# and one at the end\n"

    with _edited(project["code"] / "toolkit" / "modeling.py", reword):
        assert _rebuilt(_status(project)) == []


def test_a_real_edit_to_the_model_module_rebuilds_finetune_only_and_status_names_it(project):
    with _edited(project["code"] / "toolkit" / "modeling.py", lambda text: text.replace('"tiny": (2, 128, 2)',
                                                                                     '"tiny": (1, 128, 2)')):
        steps = _status(project)
    assert _rebuilt(steps) == ["finetune"]
    assert "source module toolkit/modeling.py changed" in steps["finetune"]["reasons"]


def test_an_edit_to_a_great_expectations_suite_rebuilds_validate_and_what_follows(project):
    with _edited(project["code"] / "data_checks" / "clean_suite.py", lambda text: text + "\nSUITE_EDITION = 2\n"):
        steps = _status(project)
    assert _rebuilt(steps) == ["validate", "template", "tokenize", "finetune"]
    assert "source module data_checks/clean_suite.py changed" in steps["validate"]["reasons"]
    assert steps["template"]["reasons"] == ["input validate is rebuilt first"]


def test_a_config_key_rebuilds_its_step_and_status_names_the_key(project):
    steps = _status(project, extra=["tokenize.max_length=96"])
    assert _rebuilt(steps) == ["tokenize", "finetune"]
    assert "config key max_length: 128 -> 96" in steps["tokenize"]["reasons"]


def test_changed_data_rebuilds_from_ingest_and_status_says_the_source_changed(project):
    with _edited(project["source"], lambda text: text.replace("apple 0", "apple zero")):
        steps = _status(project)
    assert _rebuilt(steps) == ["ingest", "clean", "validate", "template", "tokenize", "finetune"]
    assert any(reason.startswith("source data") for reason in steps["ingest"]["reasons"])


def test_a_rebuild_logs_its_reason_and_records_it_in_the_manifest(project):
    result = _itune(project, "run", "--until", "tokenize", extra=["tokenize.max_length=96"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building tokenize" in result.stdout + result.stderr
    assert "config key max_length: 128 -> 96" in result.stdout + result.stderr
    built = (project["code"].parent / "artifacts" / "tokenize").glob("*/manifest.json")
    manifests = [json.loads(p.read_text()) for p in built]
    assert any("config key max_length: 128 -> 96" in m["rebuilt_because"] for m in manifests)


def test_a_library_upgrade_changes_the_code_version_of_the_steps_that_depend_on_it(monkeypatch):
    from catalog import keys
    from tasks.finetune import STEP as FINETUNE
    from tasks.ingest import STEP as INGEST

    before = {"finetune": FINETUNE.code, "ingest": INGEST.code}
    real_version = keys.metadata.version
    monkeypatch.setattr(keys.metadata, "version",
                        lambda name: "99.0.0" if name == "transformers" else real_version(name))
    assert FINETUNE.code != before["finetune"] and INGEST.code == before["ingest"]
    previous = {"inputs": [], "config": {}, "code": before["finetune"]}
    planned = {"inputs": [], "config": {}, "code": FINETUNE.code, "source": ""}
    assert any(r.startswith("library transformers: ") and r.endswith("-> 99.0.0")
               for r in rebuild_reasons(previous, planned))


def test_module_hashes_follow_imports_transitively_including_lazy_ones():
    ingest, finetune = module_hashes("tasks.ingest"), module_hashes("tasks.finetune")
    assert "toolkit/builtin_tasks.py" in ingest and "toolkit/modeling.py" not in ingest
    assert {"toolkit/modeling.py", "toolkit/tokenizer.py", "catalog/store.py"} <= set(finetune)
    assert "data_checks/tokenized_suite.py" in module_hashes("tasks.tokenize")
