"""The package layering and the public API: imports point one way, and what `metalora` exports exists."""

import ast
from pathlib import Path

import pytest
import torch
from smoke import SMOKE

import metalora
from metalora.config import ConfigError, load_config

PACKAGE = Path(metalora.__file__).parent
# Each package may import those before it in this order (and the top-level modules), never those after it.
LAYERS = ["speed", "method", "data", "modeling", "training", "evaluation", "reporting", "experiments", "jobs"]


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metalora."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("metalora."))
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_packages_import_only_the_layers_before_them(layer):
    later = set(LAYERS[LAYERS.index(layer) + 1 :]) | {"benchmarks", "cli"}
    for module in sorted((PACKAGE / layer).rglob("*.py")):
        wrong = _imported_packages(module) & later
        assert not wrong, f"{module.relative_to(PACKAGE)} imports {sorted(wrong)}"


def test_the_method_reads_no_data_module():
    for module in (PACKAGE / "method").glob("*.py"):
        assert "data" not in _imported_packages(module), module.name


def test_every_exported_name_resolves():
    for name in metalora.__all__:
        assert getattr(metalora, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        metalora.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "old, new",
    [("meta.task_batched=true", "speed.task_batched"), ("model.weight_first_logits=false", "speed.weight_first_logits"),
     ("train.compile_layers=true", "speed.compile_layers")],  # fmt: skip
)
def test_a_speed_option_under_its_old_group_names_the_new_key(old, new):
    with pytest.raises(ConfigError, match=f"is now '{new}'"):
        load_config(SMOKE, [old])


def test_the_readme_meta_step_by_hand_runs_and_moves_the_shared_lora():
    readme = (PACKAGE.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, run as a user would
    assert scope["result"].stepped and len(scope["stats"]) == scope["cfg"].meta.meta_batch_size
    # build_parts seeds the LoRA init: a fresh build holds the weights the README's steps started from.
    start = metalora.build_parts(scope["cfg"]).shared
    moved = scope["parts"].shared
    assert start.keys() == moved.keys() and all(not torch.equal(start[k], moved[k]) for k in start if "lora_B" in k)
