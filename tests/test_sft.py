"""SFT stage: training moves parameters and validation loss; LoRA trains adapters only; bad input is named."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main
from rlhf.config import SFTConfig
from rlhf.configlib import ConfigError, from_dict
from rlhf.data.chat import pack_right
from rlhf.data.io import DataError
from rlhf.models.loading import load_causal_lm
from rlhf.stages.sft import run_sft


def sft_config(model, data, out, **train):
    return from_dict(SFTConfig, {
        "model": str(model), "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.25, "max_length": 64},
        "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-3, "eval_every": 8, "warmup_ratio": 0.0, **train},
    })


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_sft_changes_parameters_and_lowers_validation_loss(which, request, sft_file, tmp_path):
    model_dir = request.getfixturevalue(which)
    summary = run_sft(sft_config(model_dir, sft_file, tmp_path / "out"))
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5
    before, after = weights(model_dir), weights(tmp_path / "out")
    changed = [k for k in before if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in m for m in metrics) and any("train/loss" in m for m in metrics)
    model, tok = load_causal_lm(tmp_path / "out")  # the output is an ordinary model folder
    assert tok.chat_template and model.config.pad_token_id == tok.pad_token_id


def test_lora_changes_only_adapter_weights(tiny_llama, sft_file, tmp_path):
    cfg = sft_config(tiny_llama, sft_file, tmp_path / "lora", max_steps=6)
    cfg.lora.enabled, cfg.lora.save = True, "adapter"
    run_sft(cfg)
    adapter = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it moved
    assert not (tmp_path / "lora" / "model.safetensors").exists()

    # Merged: base weights outside the adapted projections are untouched.
    cfg = sft_config(tiny_llama, sft_file, tmp_path / "merged", max_steps=6)
    cfg.lora.enabled = True
    run_sft(cfg)
    before, after = weights(tiny_llama), weights(tmp_path / "merged")
    for k in before:
        adapted = "q_proj" in k or "v_proj" in k
        assert torch.equal(before[k], after[k]) != adapted, k


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tiny_llama, sft_file, tmp_path):
    # batch 8 in micro-batches of 4 (2 accumulation steps) = batch 8 in one pass: the loss is normalised by the
    # scored tokens of the whole step, not averaged per micro-batch.
    whole = run_sft(sft_config(tiny_llama, sft_file, tmp_path / "whole", max_steps=3, batch_size=8))
    accum = run_sft(sft_config(tiny_llama, sft_file, tmp_path / "accum", max_steps=3, batch_size=8, micro_batch_size=4))
    assert whole["steps"] == accum["steps"] == 3
    assert abs(whole["val_loss"] - accum["val_loss"]) < 1e-5
    wa, wb = weights(tmp_path / "whole"), weights(tmp_path / "accum")
    assert any(not torch.equal(wa[k], weights(tiny_llama)[k]) for k in wa)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_padding_free_batches_train_as_padded_ones(tiny_llama, tmp_path, monkeypatch):
    import rlhf.stages.sft as sft

    sft_file = tmp_path / "sft.jsonl"  # answers of 1 to 4 sentences: short ones share a row
    sft_file.write_text("".join(json.dumps({"prompt": f"What is {i % 7} + 2?", "completion": f"{i % 7 + 2}." + " Yes." * (i % 4)})
                                + "\n" for i in range(48)))

    rows = []  # (samples, rows) of each packed batch

    def counting(batch, pad_id):
        out = pack_right(batch, pad_id)
        rows.append((len(batch), len(out["input_ids"])))
        return out

    monkeypatch.setattr(sft, "pack_right", counting)
    packed = run_sft(sft_config(tiny_llama, sft_file, tmp_path / "packed", max_steps=3, batch_size=8))
    cfg = sft_config(tiny_llama, sft_file, tmp_path / "padded", max_steps=3, batch_size=8)
    cfg.padding_free = False
    calls = len(rows)
    padded = run_sft(cfg)
    assert len(rows) == calls and sum(n for _, n in rows) < sum(b for b, _ in rows)  # packed: fewer rows; padded: none
    assert packed["initial_val_loss"] == pytest.approx(padded["initial_val_loss"], abs=1e-6)
    assert abs(packed["val_loss"] - padded["val_loss"]) < 1e-5
    wa, wb = weights(tmp_path / "packed"), weights(tmp_path / "padded")
    assert any(not torch.equal(wa[k], weights(tiny_llama)[k]) for k in wa)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_global_batch_that_does_not_split_into_micro_batches_is_refused(tiny_llama, sft_file, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size \(3\) must divide the per-device batch"):
        run_sft(sft_config(tiny_llama, sft_file, tmp_path / "bad", max_steps=1, batch_size=8, micro_batch_size=3))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "What is 1 + 1?", "completion": "2."', r"sft\.jsonl:3: .*(JSON|json)"),
        ('{"prompt": "What is 1 + 1?"}', r"sft\.jsonl:3: field 'completion'.*missing|sft\.jsonl:3: .*missing field"),
        ('{"prompt": "What is 1 + 1?", "completion": "  "}', r"sft\.jsonl:3: field 'completion'"),
        ('{"prompt": "What is 1 + 1?", "completion": 2}', r"sft\.jsonl:3: field 'completion'.*number"),
    ],
)
def test_bad_rows_fail_naming_file_line_and_field(line, message, tiny_llama, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    good = json.dumps({"prompt": "What is 2 + 2?", "completion": "4."})
    data.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=message):
        run_sft(sft_config(tiny_llama, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
    code = main(["sft", "--model", str(tiny_llama), "--data.path", str(data), "--out", str(tmp_path / "out")])
    assert code == 2 and "sft.jsonl:3" in capsys.readouterr().err


def test_skip_policy_trains_on_the_good_rows(tiny_llama, tmp_path, caplog):
    data = tmp_path / "sft.jsonl"
    rows = [json.dumps({"prompt": f"What is {i} + 1?", "completion": f"{i + 1}."}) for i in range(12)]
    rows.insert(5, '{"prompt": "broken"')
    data.write_text("\n".join(rows) + "\n")
    cfg = sft_config(tiny_llama, data, tmp_path / "out", max_steps=2)
    cfg.data.on_error = "skip"
    summary = run_sft(cfg)
    assert summary["samples"] + summary["val_samples"] == 12
    assert "skipped 1 of 13 rows" in caplog.text and "sft.jsonl:6" in caplog.text


def test_unknown_config_key_fails_before_work(tiny_llama, sft_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    code = main(["sft", "--config", str(cfg), "--model", str(tiny_llama), "--data.path", str(sft_file), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "c.yaml" in err and "unknown key 'train.lrr'" in err
    assert not (tmp_path / "o").exists()


def test_overlong_samples_with_truncation_error_are_bad_rows(tiny_llama, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "What is 1 + 1?", "completion": "2."}] * 3 + [{"prompt": "long " * 80, "completion": "ok."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = sft_config(tiny_llama, data, tmp_path / "out")
    cfg.data.truncation = "error"
    # The message names the part that is too long: here the prompt, not the completion.
    with pytest.raises(DataError, match=r"sft\.jsonl:4: field 'prompt': the prompt is \d+ tokens and the response \d+: "
                       r"\d+ in all, longer than data.max_length 64"):
        run_sft(cfg)
    rows[3] = {"prompt": "Hi", "completion": "long " * 80}
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:4: field 'completion'"):
        run_sft(cfg)
