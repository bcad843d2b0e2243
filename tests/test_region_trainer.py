"""RegionTrainer logs named loss terms; training stages freeze exactly what they say."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, TrainingArguments
from transformers.utils import ModelOutput

from hf_regionmm.trainers import RegionTrainer, TrainingStage, apply_training_stage, stage_by_name


class _TwoTermConfig(PreTrainedConfig):
    model_type = "two_term_test"


@dataclass
class _TwoTermOutput(ModelOutput):
    loss: torch.Tensor | None = None
    loss_dict: dict | None = None


class _TwoTermModel(PreTrainedModel):
    """y = w·x + b with a squared-error term and an L1 term on w; loss = mse + 0.5 * l1."""

    config_class = _TwoTermConfig

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.Linear(3, 1)
        self.head = nn.Linear(1, 1)
        self.post_init()

    def forward(self, x, y):
        prediction = self.head(self.encoder(x)).squeeze(-1)
        mse = ((prediction - y) ** 2).mean()
        l1 = self.encoder.weight.abs().sum()
        return _TwoTermOutput(loss=mse + 0.5 * l1, loss_dict={"mse": mse, "loss_l1": l1})


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_each_named_loss_term_is_logged_and_consistent_with_the_total(tmp_path):
    torch.manual_seed(0)
    model = _TwoTermModel(_TwoTermConfig())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        learning_rate=0.0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = RegionTrainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for entry in logs:
        assert {"loss_mse", "loss_l1"} <= entry.keys()
        # With lr 0 the model is fixed, so the logged total must equal mse + 0.5 * l1 of the same batches.
        assert entry["loss"] == pytest.approx(entry["loss_mse"] + 0.5 * entry["loss_l1"], rel=1e-4)
    expected_l1 = model.encoder.weight.abs().sum().item()
    # Logged values are rounded to 6 decimals.
    assert all(entry["loss_l1"] == pytest.approx(expected_l1, rel=1e-5, abs=1e-6) for entry in logs)


def test_training_stage_freezes_everything_it_does_not_name():
    model = _TwoTermModel(_TwoTermConfig())
    stage = TrainingStage(name="head_only", trainable=("head.",), learning_rate=2e-4, weight_decay=1e-4)
    counts = apply_training_stage(model, stage)
    assert counts == {"trainable": 2, "frozen": 4}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert stage.training_arguments_overrides()["learning_rate"] == 2e-4

    with_exception = TrainingStage(name="all_but_bias", trainable=("encoder.", "head."), frozen=(".bias",))
    apply_training_stage(model, with_exception)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["encoder.weight", "head.weight"]


def test_training_stage_errors_name_the_problem():
    model = _TwoTermModel(_TwoTermConfig())
    with pytest.raises(ValueError, match="match no parameter"):
        apply_training_stage(model, TrainingStage(name="typo", trainable=("heda.",)))
    with pytest.raises(ValueError, match="`trainable`"):
        TrainingStage(name="empty", trainable=())
    with pytest.raises(ValueError, match="Unknown training stage 'x'"):
        stage_by_name([TrainingStage(name="det", trainable=("a",))], "x")


def test_trainer_with_a_stage_table_freezes_at_construction_and_switches(tmp_path):
    class _StagedTrainer(RegionTrainer):
        stages = (
            TrainingStage(name="head", trainable=("head.",)),
            TrainingStage(name="all", trainable=("encoder.", "head.")),
        )
        default_stage = "head"

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    model = _TwoTermModel(_TwoTermConfig())
    trainer = _StagedTrainer(model=model, args=args, train_dataset=_Rows())
    assert trainer.stage.name == "head" and trainer.stage_parameter_counts == {"trainable": 2, "frozen": 4}
    trainer.set_stage("all")
    assert all(p.requires_grad for p in model.parameters())
    assert _StagedTrainer(model=model, args=args, train_dataset=_Rows(), stage="all").stage.name == "all"
    with pytest.raises(ValueError, match="defines no training stages"):
        RegionTrainer(model=model, args=args, train_dataset=_Rows(), stage="head")
