"""What a fresh environment gets: every import declared, one set of pins, the console scripts."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from official_layout import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The project itself and the test helpers next to this file (imported by module name from tests/).
LOCAL_MODULES = {"chatglm_ptuning", "scripts", "tests"} | {path.stem for path in (REPO_ROOT / "tests").glob("*.py")}
# Imports that need a distribution their own package does not declare.
UNDECLARED_BY_PROVIDER = {"sentencepiece.sentencepiece_model_pb2": "protobuf"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(requirement: str) -> tuple[str, str]:
    """'transformers>=5.24,<6  # why' -> ('transformers', '>=5.24,<6')."""
    text = requirement.split("#")[0].strip()
    name = re.match(r"[A-Za-z0-9._-]+", text).group(0)
    return normalize(name), text[len(name) :].replace(" ", "")


def requirement_files() -> dict[str, str]:
    pins = {}
    for file in ("requirements.txt", "requirements-test.txt"):
        for line in (REPO_ROOT / file).read_text(encoding="utf-8").splitlines():
            if line.split("#")[0].strip():
                name, spec = parse(line)
                assert name not in pins, f"{file}: {name} is listed twice"
                pins[name] = spec
    return pins


def pyproject_pins() -> dict[str, str]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return dict(parse(line) for line in lines)


def third_party_imports() -> dict[str, set[str]]:
    """Imported module name -> the files importing it (import statements and pytest.importorskip), over
    chatglm_ptuning/, scripts/ and tests/."""
    found: dict[str, set[str]] = {}
    for tree in ("chatglm_ptuning", "scripts", "tests"):
        for path in sorted((REPO_ROOT / tree).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif (
                    isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)
                ):
                    names = [node.args[0].value]  # pytest.importorskip("x"): still a dependency of the suite
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL_MODULES:
                        found.setdefault(name, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_requirement_files_and_pyproject_pin_the_same_versions():
    files, project = requirement_files(), pyproject_pins()
    assert {name: project.get(name) for name in files} == files
    assert set(project) - set(files) <= {"tensorboard"}  # optional logger, never imported here


def test_every_import_of_package_scripts_and_tests_is_declared():
    declared = set(requirement_files())
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        top = module.split(".")[0]
        if top not in providers:
            if module == top:  # `from x import name` also records x.name, which may be an attribute
                undeclared[module] = f"not installed (imported by {sorted(files)})"
            continue
        dists = {normalize(d) for d in providers[top]}
        if dists.isdisjoint(declared):
            undeclared[module] = f"{sorted(dists)} (imported by {sorted(files)})"
        if UNDECLARED_BY_PROVIDER.get(module, top) not in declared | {top}:
            undeclared[module] = f"{UNDECLARED_BY_PROVIDER[module]} (imported by {sorted(files)})"
    assert undeclared == {}


def test_console_scripts_resolve_to_mains_that_need_no_arguments():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"chatglm-ptuning-train", "chatglm-ptuning-web-demo", "chatglm-ptuning-api", "chatglm-ptuning-cli-demo",
            "chatglm-ptuning-metrics"} <= set(scripts)
    for name, target in scripts.items():
        module, attribute = target.split(":")
        main = getattr(importlib.import_module(module), attribute)
        assert callable(main), name
        required = [p for p in inspect.signature(main).parameters.values() if p.default is inspect.Parameter.empty]
        assert required == [], f"{name}: {target} needs {required}"


@pytest.mark.slow
def test_installed_metrics_script_scores_a_predictions_file(tmp_path):
    script = Path(sys.executable).parent / "chatglm-ptuning-metrics"
    installed = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    if "chatglm-ptuning-metrics" not in installed or not script.is_file():
        pytest.skip("console scripts not installed in this environment (pip install -e .)")
    predictions = tmp_path / "generated_predictions.txt"
    predictions.write_text(json.dumps({"labels": "今天天气很好", "predict": "今天天气很好"}, ensure_ascii=False) + "\n")
    result = subprocess.run([str(script), str(predictions), "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
