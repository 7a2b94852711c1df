"""Task suites: validation errors, selection, leak-free splits, the embedded suite and the real data."""

import json
from pathlib import Path

import pytest
from split_reference import heldout_pools, meta_pools

from metalora.config import load_config
from metalora.data.embedded_suite import FAMILIES, embedded_suite
from metalora.data.splits import build_splits
from metalora.data.tasks import Example, Task, TaskError, TaskSuite, load_suite_dir, merge_suites, select_tasks

# Episode and shot sizes any tiny budget can give: these tests look at the splits alone.
SPLIT_ONLY = ["meta.n_support=1", "meta.n_query=1", "eval.n_shots=[0,1]"]


def make_suite(tmp_path: Path, manifest: dict, files: dict[str, str]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": manifest}))
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    return tmp_path


GOOD = '{"input": "1", "target": "2"}\n{"input": "3", "target": "4"}\n'


def test_a_valid_suite_loads(tmp_path):
    suite = load_suite_dir(make_suite(tmp_path, {"t": {"instruction": "Add one."}}, {"t": GOOD}))
    task = suite.tasks["t"]
    assert task.metric == "exact_match" and [e.target for e in task.examples] == ["2", "4"]
    assert [e.id for e in task.examples] == ["t:1", "t:2"]


@pytest.mark.parametrize(
    ("manifest", "files", "message"),
    [
        ({"t": {}}, {}, r"t\.jsonl: example file of task 't' not found"),
        ({"t": {}}, {"t": GOOD + "{not json\n"}, r"t\.jsonl: line 3: malformed JSON"),
        ({"t": {}}, {"t": '{"input": "1"}\n'}, r"t\.jsonl: line 1: field 'target' is missing"),
        ({"t": {}}, {"t": '{"target": "1"}\n'}, r"t\.jsonl: line 1: field 'input' is missing"),
        ({"t": {}}, {"t": "\n"}, r"task 't' has no examples"),
        ({"t": {"options": ["yes", "no"]}}, {"t": '{"input": "a", "target": "maybe"}\n'}, r"line 1: .*not one of"),
        ({"t": {"metric": "bleu"}}, {"t": GOOD}, r"tasks\.json: task 't': field 'metric'"),
        ({"t": {"options": "yes"}}, {"t": GOOD}, r"task 't': field 'options'"),
        ({"t": {}}, {"t": '{"input": "a", "target": "b", "group": 7}\n'}, r"t\.jsonl: line 1: field 'group' must be"),
    ],
)
def test_validation_errors_name_file_line_and_field(tmp_path, manifest, files, message):
    with pytest.raises(TaskError, match=message):
        load_suite_dir(make_suite(tmp_path, manifest, files))


def test_missing_or_malformed_manifest(tmp_path):
    with pytest.raises(TaskError, match="tasks.json: task manifest not found"):
        load_suite_dir(tmp_path)
    (tmp_path / "tasks.json").write_text("{\n  oops")
    with pytest.raises(TaskError, match=r"tasks.json: line 2: malformed JSON"):
        load_suite_dir(tmp_path)


def test_duplicate_task_names_across_suites(tmp_path):
    a = load_suite_dir(make_suite(tmp_path / "a", {"t": {}}, {"t": GOOD}))
    b = load_suite_dir(make_suite(tmp_path / "b", {"t": {}}, {"t": GOOD}))
    with pytest.raises(TaskError, match="duplicate task name 't' in first and second"):
        merge_suites([("first", a), ("second", b)])


def _suite(*names: str) -> TaskSuite:
    examples = [Example(id=f"{i}", input=str(i), target=str(i)) for i in range(10)]
    return TaskSuite(tasks={n: Task(n, "", "exact_match", examples) for n in names})


def test_task_selection_with_globs_and_exclusions():
    suite = _suite("lama_a", "lama_b", "lama_c", "sst2")
    train, held = select_tasks(suite, ["lama_*"], ["lama_c"], [])
    assert (train, held) == (["lama_a", "lama_b"], ["lama_c"])
    train, held = select_tasks(suite, [], ["lama_c"], ["sst2"])
    assert (train, held) == (["lama_a", "lama_b"], ["lama_c"])
    with pytest.raises(TaskError, match=r"data\.heldout_tasks: 'bbh_\*' matches no task"):
        select_tasks(suite, [], ["bbh_*"], [])


def test_no_pattern_can_put_a_heldout_task_into_meta_training():
    suite = _suite("lama_a", "lama_b")
    train, held = select_tasks(suite, ["*"], ["lama_b"], [])
    assert train == ["lama_a"] and held == ["lama_b"]
    train, held = select_tasks(suite, [], ["lama_*"], [])
    assert train == [] and held == ["lama_a", "lama_b"]


def test_splits_are_deterministic_disjoint_and_capped():
    task = _suite("t").tasks["t"]
    pools = meta_pools(task, max_samples=8, support_fraction=0.5, seed=3)
    again = meta_pools(task, max_samples=8, support_fraction=0.5, seed=3)
    assert [e.id for e in pools.support] == [e.id for e in again.support]
    assert len(pools.support) + len(pools.query) == 8
    assert not {e.id for e in pools.support} & {e.id for e in pools.query}
    other = meta_pools(task, max_samples=8, support_fraction=0.5, seed=4)
    assert [e.id for e in other.support] != [e.id for e in pools.support]
    held = heldout_pools(task, n_test=3, seed=3)
    assert len(held.test) == 3 and not {e.id for e in held.test} & {e.id for e in held.adapt}


def test_a_task_too_small_to_split():
    tiny = Task("t", "", "exact_match", [Example("t:1", "a", "b")])
    with pytest.raises(TaskError, match="task 't' has 1 example"):
        meta_pools(tiny, 10, 0.5, 0)


def test_embedded_suite_is_deterministic_with_a_seen_and_unseen_heldout_split():
    suite, again = embedded_suite(), embedded_suite()
    assert len(suite.tasks) >= 40 and len(FAMILIES) >= 8
    for name, task in suite.tasks.items():
        assert [(e.input, e.target) for e in task.examples] == [(e.input, e.target) for e in again.tasks[name].examples]
        assert len({e.input for e in task.examples}) == len(task.examples) >= 200, name
        assert max(len(e.target) for e in task.examples) <= 12, name
    assert not set(suite.default_train) & set(suite.default_heldout)
    train_families = {suite.tasks[n].family for n in suite.default_train}
    held_families = {suite.tasks[n].family for n in suite.default_heldout}
    assert held_families & train_families, "held-out tasks inside seen families"
    assert held_families - train_families, "wholly unseen held-out families"


def test_embedded_examples_are_correct():
    tasks = embedded_suite().tasks
    for example in tasks["add_7"].examples[:20]:
        assert int(example.target) == int(example.input) + 7
    for example in tasks["linear_3"].examples[:20]:
        left, right = example.input.split(" = ")
        b = int(left.split(" + ")[1])
        assert 3 * int(example.target) + b == int(right)
    assert tasks["caesar_1"].examples[0].target == "".join(
        chr((ord(c) - 97 + 1) % 26 + 97) for c in tasks["caesar_1"].examples[0].input
    )


@pytest.mark.slow
def test_the_real_suite_loads_and_splits(shared_tasks):
    cfg = load_config(
        overrides=[f"data.suites=[{shared_tasks}]", "data.train_tasks=[lama_*]", "data.heldout_tasks=[lama_p17_*]"]
    )
    suite = load_suite_dir(shared_tasks)
    assert len(suite.tasks) == 49
    assert suite.tasks["sst2_sentiment"].options and suite.tasks["sst2_sentiment"].metric == "accuracy"
    experiment = build_splits(cfg.data)
    assert "lama_p17_country" in experiment.heldout and "lama_p17_country" not in experiment.train
    assert len(experiment.train) == sum(n.startswith("lama_") for n in suite.tasks) - 1
    for pools in experiment.heldout.values():
        assert not {e.id for e in pools.test} & {e.id for e in pools.adapt}


def _grouped_suite(tmp_path: Path, n_items: int = 40, languages: tuple[str, ...] = ("en", "it", "sw")) -> Path:
    """Every language holds a translation of the same items, each example marked with its item's group."""
    manifest = {f"lang_{code}": {"instruction": "Pick.", "options": ["1", "2"]} for code in languages}
    files = {
        f"lang_{code}": "".join(
            json.dumps({"input": f"{code} item {i}", "target": str(1 + i % 2), "group": f"item:{i}"}) + "\n"
            for i in range(n_items)
        )
        for code in languages
    }
    return make_suite(tmp_path / "grouped", manifest, files)


def _sides(experiment) -> dict[str, set[str]]:
    """The groups on each side of an experiment: training pools, adaptation pools, test sets."""
    groups = experiment.groups
    sides = {"train": set(), "adapt": set(), "test": set()}
    for pools in experiment.train.values():
        sides["train"] |= {groups[e.id] for e in pools.support + pools.query}
    for pools in experiment.heldout.values():
        sides["adapt"] |= {groups[e.id] for e in pools.adapt}
        sides["test"] |= {groups[e.id] for e in pools.test}
    for pools in experiment.seen.values():
        sides["test"] |= {groups[e.id] for e in pools.test}
    return sides


def _assert_no_group_straddles(experiment) -> None:
    sides = _sides(experiment)
    assert not sides["train"] & sides["adapt"] and not sides["train"] & sides["test"]
    assert not sides["adapt"] & sides["test"]


def test_groups_stay_on_one_side_across_tasks(tmp_path):
    suite = _grouped_suite(tmp_path)
    assert load_suite_dir(suite).tasks["lang_it"].examples[3].group == "item:3"
    for scenario in ("heldout", "seen"):
        cfg = load_config(overrides=[*SPLIT_ONLY, f"data.suites=[{suite}]", "data.heldout_tasks=[lang_sw]",
                                     "data.n_test=8", "data.max_adapt_pool=10", "data.samples_per_task=12",
                                     f"eval.scenario={scenario}"])  # fmt: skip
        experiment = build_splits(cfg.data, cfg.eval.scenario)
        _assert_no_group_straddles(experiment)
        # Translations of one item sit at the same rank, so the test sets hold the same items in every language.
        tests = [{experiment.groups[e.id] for e in p.test} for p in [*experiment.heldout.values(),
                                                                      *experiment.seen.values()]]  # fmt: skip
        assert all(t == tests[0] for t in tests) and len(tests[0]) == 8
    assert sorted(experiment.seen) == ["lang_en", "lang_it"]
    assert {n: len(p.support) + len(p.query) for n, p in experiment.train.items()} == {"lang_en": 12, "lang_it": 12}


def test_ungrouped_splits_are_what_they_were(tmp_path):
    suite = make_suite(tmp_path, {"a": {}, "b": {}}, {n: "".join(
        json.dumps({"input": f"{n}{i}", "target": "x"}) + "\n" for i in range(30)) for n in "ab"})  # fmt: skip
    cfg = load_config(overrides=[*SPLIT_ONLY, f"data.suites=[{suite}]", "data.heldout_tasks=[b]", "data.n_test=5",
                                 "data.samples_per_task=20"])  # fmt: skip
    experiment = build_splits(cfg.data)
    task_a, task_b = (load_suite_dir(suite).tasks[n] for n in "ab")
    old_a, old_b = meta_pools(task_a, 20, 0.5, seed=0), heldout_pools(task_b, 5, seed=0)
    assert [e.id for e in experiment.train["a"].support] == [e.id for e in old_a.support]
    assert [e.id for e in experiment.heldout["b"].test] == [e.id for e in old_b.test]


def test_the_seen_scenario_carves_the_test_set_before_the_budget(tmp_path):
    suite = _grouped_suite(tmp_path, languages=("en", "it"))
    overrides = [*SPLIT_ONLY, f"data.suites=[{suite}]", "data.n_test=10", "eval.scenario=seen"]
    budgets = '{"lang_en": all, "*": 6}'
    experiment = build_splits(load_config(overrides=[*overrides, f"data.samples_per_task={budgets}"]).data, "seen")
    assert {n: len(p.support) + len(p.query) for n, p in experiment.train.items()} == {"lang_en": 30, "lang_it": 6}
    assert experiment.budgets == {"lang_en": "all", "lang_it": 6}
    for name, pools in experiment.seen.items():
        assert len(pools.test) == 10
        trained = {e.id for e in experiment.train[name].support + experiment.train[name].query}
        assert not trained & {e.id for e in pools.test} and {e.id for e in pools.adapt} == trained
    _assert_no_group_straddles(experiment)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.samples_per_task=50"], r"task 'lang_\w+': data.samples_per_task gives it 50 examples, but it has 30"),
        (['data.samples_per_task={"nope_*": 5, "*": 5}'], r"data.samples_per_task.nope_\*: 'nope_\*' matches no task"),
        (['data.samples_per_task={"lang_en": 5}'], r"no glob matches training task 'lang_it'"),
        (["data.n_test=39"], r"seen task 'lang_\w+' has 40 examples: a test set of data.n_test=39"),
    ],
)
def test_bad_budgets_name_the_task_or_key(tmp_path, overrides, message):
    suite = _grouped_suite(tmp_path, languages=("en", "it"))
    cfg = load_config(overrides=[*SPLIT_ONLY, f"data.suites=[{suite}]", "data.n_test=10", "eval.scenario=seen",
                                 *overrides])  # fmt: skip
    with pytest.raises(TaskError, match=message):
        build_splits(cfg.data, cfg.eval.scenario)


@pytest.mark.slow
def test_no_xcopa_group_straddles_sides(tmp_path):
    cfg = load_config(["params/base.yaml", "params/xcopa_cpu.yaml"])
    experiment = build_splits(cfg.data, cfg.eval.scenario)
    assert experiment.seen and experiment.heldout
    _assert_no_group_straddles(experiment)
    # Every language is a translation of the same items: a test item of one language is a test item of all.
    assert len({frozenset(experiment.groups[e.id] for e in p.test)
                for p in [*experiment.seen.values(), *experiment.heldout.values()]}) == 1  # fmt: skip


def _bos_tokenizer():
    """A tokenizer whose post-processor prepends <s> (as Llama-3's and Gemma's do), with a chat template."""
    from tokenizers import processors

    from metalora.modeling.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = "{% for m in messages %}[USER] {{ m['content'] }} [/USER]{% endfor %}[BOT]"
    return tokenizer


def test_prompts_keep_the_tokenizers_bos_and_targets_end_with_eos():
    from metalora.data.collation import Encoder
    from metalora.modeling.models import tiny_tokenizer

    task = Task("t", "Say it.", "exact_match", [Example("t:1", "a long input " * 20, "yes")])
    example = task.examples[0]
    with_bos = _bos_tokenizer()
    ids = Encoder(with_bos, "{instruction} {input}", max_prompt_tokens=16).prompt_ids(task, example)
    assert ids[0] == with_bos.bos_token_id and len(ids) == 16  # kept although the prompt was cut from the left
    plain = tiny_tokenizer()
    ids = Encoder(plain, "{instruction} {input}", max_prompt_tokens=16).prompt_ids(task, example)
    assert plain.bos_token_id not in ids
    target = Encoder(plain, "{input}").target_ids("yes")
    assert target[-1] == plain.eos_token_id


def test_the_chat_template_wraps_prompts_only_when_asked():
    from metalora.config import ConfigError
    from metalora.data.collation import Encoder
    from metalora.modeling.models import tiny_tokenizer

    task = Task("t", "Say it.", "exact_match", [Example("t:1", "hello", "yes")])
    chat = Encoder(_bos_tokenizer(), "{instruction} {input}", chat_template=True)
    assert chat.prompt(task, task.examples[0]) == "[USER] Say it. hello [/USER][BOT]"
    assert Encoder(_bos_tokenizer(), "{instruction} {input}").prompt(task, task.examples[0]) == "Say it. hello"
    with pytest.raises(ConfigError, match="data.chat_template"):
        Encoder(tiny_tokenizer(), "{input}", chat_template=True)
