"""Configs: every shipped YAML loads; bad keys, types and contradictions fail early and by name."""

import argparse
from pathlib import Path

import pytest

from rlhf.cli import build_parser
from rlhf.config import ArchConfig, PretrainConfig, RunConfig, SFTConfig, TrainConfig
from rlhf.configlib import ConfigError, add_arguments, build_config, field_docs, from_dict, load_yaml, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    cfg = from_dict(RunConfig, load_yaml(path))
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # round trip


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tiny.yaml"}


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'sft\.train\.lrr' \(did you mean 'sft\.train\.lr'\?\)"):
        from_dict(RunConfig, {"sft": {"train": {"lrr": 1e-4}}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"batch_size": "eight"}}, r"train\.batch_size: must be int"),
        ({"train": {"lr": "fast"}}, r"train\.lr: must be float"),
        ({"train": {"schedule": "cosin"}}, r"train\.schedule: must be 'cosine' \| 'linear' \| 'constant'"),
        ({"lora": {"enabled": "yes"}}, r"lora\.enabled: must be bool"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size: must be >= 1"),
        ({"load": {"dtype": "bfloat16"}}, r"load\.dtype='bfloat16' trains all weights in low precision"),
    ],
)
def test_wrong_types_and_contradictions_fail(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SFTConfig, data)


def test_contradictory_shape_fails_at_parse_time():
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by arch.num_heads \(3\)"):
        from_dict(ArchConfig, {"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ConfigError, match=r"seq_len \(600\) exceeds arch.max_position_embeddings"):
        from_dict(PretrainConfig, {"seq_len": 600})


def test_yaml_1e_notation_is_a_float():
    assert from_dict(TrainConfig, {"lr": "1e-3"}).lr == pytest.approx(1e-3)


def test_yaml_no_is_the_literal_choice_spelled_no(tmp_path):
    # YAML 1.1 reads `no` as False, in a file and in a flag alike; a choice spelled "no" is what was meant.
    path = tmp_path / "run.yaml"
    path.write_text("sft:\n  train:\n    mixed_precision: no\n")
    ns = build_parser().parse_args(["sft", "--config", str(path)])
    assert build_config(SFTConfig, ns, section="sft", whole=RunConfig).train.mixed_precision == "no"
    ns = build_parser().parse_args(["sft", "--train.mixed_precision", "no"])
    assert build_config(SFTConfig, ns, section="sft", whole=RunConfig).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"schedule: must be 'cosine'"):  # no choice spelled that way
        from_dict(TrainConfig, {"schedule": False})


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sft:\n  train:\n    lr: 1.0e-3\n    batch_size: 4\n")
    ns = build_parser().parse_args(["sft", "--config", str(path), "--train.batch_size", "8", "--lora.enabled"])
    cfg = build_config(SFTConfig, ns, section="sft", whole=RunConfig)
    assert cfg.train.lr == pytest.approx(1e-3)  # from the YAML
    assert cfg.train.batch_size == 8  # the flag wins
    assert cfg.lora.enabled is True
    assert cfg.train.epochs == SFTConfig().train.epochs  # the default survives


def test_a_typo_elsewhere_in_the_pipeline_yaml_is_caught_by_a_stage_command(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sft:\n  train:\n    lr: 1.0e-3\npretrain:\n  arch:\n    hiden_size: 3\n")
    ns = build_parser().parse_args(["sft", "--config", str(path)])
    with pytest.raises(ConfigError, match=rf"{path.name}: unknown key 'pretrain\.arch\.hiden_size'"):
        build_config(SFTConfig, ns, section="sft", whole=RunConfig)


def test_field_docstrings_are_the_help_text():
    docs = field_docs(TrainConfig)
    assert docs["micro_batch_size"].startswith("Sequences per forward pass on each device")
    parser = argparse.ArgumentParser()
    add_arguments(parser, SFTConfig)
    help_text = parser.format_help()
    assert "--train.micro_batch_size" in help_text and "Sequences per forward pass" in help_text
    assert "--lora.target_modules" in help_text and "--no-lora.enabled" in help_text
    # The stage's own defaults are shown (SFT trains 3 epochs by default, the bare TrainConfig 1).
    epochs = next(a for a in parser._actions if a.dest == "train.epochs")
    assert epochs.help.endswith("[int; default: 3]")
