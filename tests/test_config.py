from pathlib import Path

import pytest

from metalora.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_reference_settings():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.meta.inner_lr, cfg.meta.inner_steps, cfg.meta.inner_batch_size) == (1e-4, 10, 4)
    assert (cfg.meta.meta_lr, cfg.meta.meta_batch_size, cfg.meta.n_support) == (5e-5, 4, 50)


def test_layers_merge_in_order_and_overrides_win(tmp_path):
    a = write(tmp_path, "a.yaml", "lora:\n  r: 8\nmeta:\n  inner_steps: 3\n")
    b = write(tmp_path, "b.yaml", "lora:\n  r: 4\n")
    cfg = load_config([a, b], ["meta.inner_steps=7", "lora.target_modules=[q_proj]"])
    assert cfg.lora.r == 4
    assert cfg.meta.inner_steps == 7
    assert cfg.lora.target_modules == ["q_proj"]


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    cfg = load_config([write(tmp_path, "a.yaml", "meta:\n  inner_lr: 1e-4\n  meta_lr: 3e-5\n")])
    assert isinstance(cfg.meta.inner_lr, float) and cfg.meta.inner_lr == 1e-4
    assert cfg.meta.meta_lr == 3e-5


def test_string_values_are_converted_to_the_schema_type():
    cfg = load_config(overrides=["lora.r=32", "meta.first_order=false", "lora.dropout=0.1"])
    assert cfg.lora.r == 32 and cfg.meta.first_order is False and cfg.lora.dropout == 0.1


def test_dict_layer_for_notebook_parameters():
    cfg = load_config(values={"lora.r": 4, "meta": {"inner_steps": 2}, "eval.n_shots": [0, 5]})
    assert (cfg.lora.r, cfg.meta.inner_steps, cfg.eval.n_shots) == (4, 2, [0, 5])


def test_unknown_key_names_file_key_and_closest_names(tmp_path):
    path = write(tmp_path, "bad.yaml", "lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert str(path) in str(err.value)
    assert "lora.rank" in str(err.value)
    assert "lora.r" in str(err.value)


def test_unknown_override_suggests_names():
    with pytest.raises(ConfigError, match=r"meta\.inner_step.*did you mean: meta\.inner_steps"):
        load_config(overrides=["meta.inner_step=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config(overrides=["lora.r=many"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"meta\.algorithm"):
        load_config(overrides=["meta.algorithm=maml++"])
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        load_config(overrides=["lora.dropout=1.5"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = write(tmp_path, "broken.yaml", "lora: [r: 8\n")
    with pytest.raises(ConfigError, match=r"(?s)broken.yaml.*cannot parse YAML.*line 1"):
        load_config([bad])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["lora.r"])


def test_resolved_config_round_trips_through_the_run_dir(tmp_path):
    cfg = load_config(overrides=["lora.r=8", "meta.inner_lr=2e-4"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config([path])
    assert again == cfg
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "path", sorted([*(ROOT / "params").glob("*.yaml"), *(ROOT / "params" / "paper").glob("*.yaml")]),
    ids=lambda p: p.relative_to(ROOT / "params").as_posix(),
)
def test_shipped_parameter_files_load(path):
    cfg = load_config([ROOT / "params" / "base.yaml", path])
    if path.parent.name == "paper":  # the GPU settings of the paper: a hub model, both scenarios
        assert cfg.model.name != "embedded" and cfg.train.seeds >= 3 and cfg.model.dtype == "bfloat16"


def test_scenario_budget_and_algorithm_settings_are_checked():
    cfg = load_config(overrides=['data.samples_per_task={"xcopa_it": all, "*": 100}', "eval.scenario=seen"])
    assert cfg.data.samples_per_task == {"xcopa_it": "all", "*": 100} and cfg.eval.scenario == "seen"
    assert load_config(overrides=["data.samples_per_task=all"]).data.samples_per_task == "all"
    bad = [
        ("data.samples_per_task=1", r"'data.samples_per_task': 1; expected an integer > 1"),
        ("data.samples_per_task={a: lots}", r"'data.samples_per_task.a': 'lots'"),
        ("eval.scenario=unseen", r"eval.scenario"),
        ("meta.max_grad_norm=-1", r"meta.max_grad_norm"),
        ("train.seeds=0", r"train.seeds"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[override])
    for algorithm in ("fomaml", "reptile"):
        with pytest.raises(ConfigError, match=r"meta.first_order.*fomaml and reptile are first-order"):
            load_config(overrides=[f"meta.algorithm={algorithm}", "meta.first_order=false"])


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["meta.n_support=60", "meta.n_query=40"], r"data.samples_per_task=100 with data.support_fraction=0.5 gives a "
         r"task 50 support / 50 query examples, but an episode draws meta.n_support=60 and meta.n_query=40.*0.6"),
        (["data.samples_per_task={xl: all, '*': 30}", "meta.n_query=16"], r"data.samples_per_task.\*=30 .* 15 query"),
        (["eval.scenario=seen", "eval.n_shots=[0,120]"], r"120 shots.*data.samples_per_task gives 100"),
        (["data.max_adapt_pool=20", "eval.n_shots=[0,25]"], r"25 shots.*data.max_adapt_pool=20"),
    ],
)  # fmt: skip
def test_episode_and_shot_sizes_no_budget_can_give_are_refused_when_the_config_loads(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config([ROOT / "params" / "base.yaml"], overrides)


def test_a_budget_of_all_is_left_to_the_split_which_knows_the_data():
    cfg = load_config([ROOT / "params" / "base.yaml"], ["data.samples_per_task=all", "meta.n_support=500"])
    assert cfg.meta.n_support == 500


@pytest.mark.parametrize(
    "override, named",
    [
        ("data.max_prompt_tokens=0", "data.max_prompt_tokens"), ("data.max_target_tokens=0", "data.max_target_tokens"),
        ("eval.adapt_lr=-1e-4", "eval.adapt_lr"), ("eval.n_shots=[]", "eval.n_shots.*non-empty"),
        ("eval.n_shots=[0,5,5]", r"eval.n_shots.*distinct shot counts"),
        ("eval.methods=[lora,metalora,lora]", r"eval.methods.*distinct methods"),
        ("eval.reference=reptile", r"eval.reference.*one of eval.methods"), ("eval.max_test=0", "eval.max_test"),
        ("eval.batch_size=0", "eval.batch_size"), ("train.seed=-1", "train.seed"),
    ],
)  # fmt: skip
def test_numbers_that_make_no_sense_are_refused_with_their_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config([ROOT / "params" / "base.yaml"], [override])


def test_the_reference_defaults_to_metalora_or_else_the_first_method():
    assert load_config([ROOT / "params" / "base.yaml"]).eval.reference_method == "metalora"
    assert load_config([ROOT / "params" / "base.yaml"], ["eval.methods=[base,lora]"]).eval.reference_method == "base"
    chosen = load_config([ROOT / "params" / "base.yaml"], ["eval.methods=[base,lora]", "eval.reference=lora"])
    assert chosen.eval.reference_method == "lora"
