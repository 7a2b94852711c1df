"""`metalora export`: a trained adapter as a folder plain peft loads, with a card the Hub's parser reads."""

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from smoke import ROOT, SMOKE
from torch.func import functional_call

from metalora.cli import main as cli_main
from metalora.config import load_config
from metalora.evaluation.fewshot import adapter_init
from metalora.experiments.compare import run_evaluation
from metalora.experiments.export import ExportError, export_adapter
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.training.train import train

FAST = ["data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=1", "eval.max_test=4",
        "eval.adapt_steps=2", "data.n_test=4", "train.steps=2", "eval.methods=[base,metalora]"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path_factory.mktemp('runs')}", *FAST])
    train(cfg)
    run_evaluation(cfg)
    return cfg


def test_plain_peft_loads_the_exported_adapter_and_gives_the_kits_logits(evaluated_run, tmp_path):
    cfg = evaluated_run
    folder = export_adapter(cfg.run_dir, tmp_path / "exported")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    base, encoder = load_base(cfg)
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    kit_model, _ = load_base(cfg)
    kit_model = attach_lora(kit_model, cfg.lora, cfg.train.seed).eval()
    trained = adapter_init(kit_model, cfg.run_dir / "adapter")
    batch = encoder.collate([([1, 5, 9, 14, 3], [7, 2])])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = functional_call(kit_model, trained, args=(), kwargs=inputs).logits
        theirs = plain(**inputs).logits
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # trained, not the init
    assert torch.equal(ours, theirs)


def test_the_model_card_is_read_by_the_hubs_parser_with_its_metadata_and_evaluation(evaluated_run, tmp_path):
    folder = export_adapter(evaluated_run.run_dir, tmp_path / "exported")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "tiny-random"
    assert card.data.library_name == "peft"
    assert {"metalora", "lora", "meta-learning"} <= set(card.data.tags)
    assert card.data.datasets == ["embedded"]
    evaluation = card.text.split("## Evaluation")[1].split("## Use")[0]
    assert "score (95 % CI)" in evaluation and "| metalora |" in evaluation.replace("  ", "")
    assert "2 meta-steps" in card.text and "arXiv:2510.11598" in card.text
    assert "- embedded (licence: see the suite)" in card.text


def test_the_card_names_the_shipped_suites_sources_and_licences(tmp_path):
    suite = ROOT / "data" / "tasks"
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", "train.steps=1", f"data.suites=[{suite}]",
                              "data.train_tasks=[lama_p1001*,bbh_boolean*]", "data.heldout_tasks=[gsm8k*]",
                              "meta.meta_batch_size=2"])  # fmt: skip
    card = ModelCard.load(export_adapter(train(cfg), tmp_path / "exported") / "README.md")
    assert card.data.datasets == ["BIG-Bench Hard (suzgunmirac/BIG-Bench-Hard)",
                                  "LAMA T-REx via tonyzhaozh/few-shot-learning"]
    assert "(licence: CC BY-NC 4.0)" in card.text and "(licence: MIT)" in card.text


def test_export_refuses_an_unfinished_run_and_a_full_model(tmp_path):
    with pytest.raises(ExportError, match="not a finished run"):
        export_adapter(tmp_path, tmp_path / "out")
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", "train.steps=1", "meta.algorithm=fomaml"])
    with pytest.raises(ExportError, match="only LoRA runs export"):
        export_adapter(train(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_uploads_the_exported_folder_to_the_named_repository(evaluated_run, tmp_path, monkeypatch):
    # Stops where the network would start: the Hub client's two calls are recorded instead of sent.
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    out = tmp_path / "exported"
    assert cli_main(["export", str(evaluated_run.run_dir), str(out), "--push-to-hub", "someone/metalora-smoke"]) == 0
    (create, repo, options), (upload, uploaded, sent) = calls
    assert (create, repo, options["private"]) == ("create", "someone/metalora-smoke", True)
    assert (upload, uploaded, sent["folder_path"]) == ("upload", "someone/metalora-smoke", str(out))
    assert (out / "README.md").is_file()
