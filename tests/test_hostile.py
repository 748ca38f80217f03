"""The hostile-input sweep: every command against a folder of bad inputs ends in `rlhf COMMAND: error: ...`.

Each case runs the real command line in this process (``rlhf.cli.main``), so an uncaught exception (what
a user would see as a traceback) fails the test. A case also states what its message must name (the file,
line, field or setting), and that nothing in the bad-input folder changed. ``test_sweep_covers`` keeps
the count honest: the README quotes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import main

W = "What is 2 + 3?"


def _rows(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _bad_models(root: Path, llama: Path) -> dict[str, str]:
    """Model folders that are broken in the ways users' folders are."""
    out = {}
    (root / "empty_dir").mkdir()
    out["not_a_model"] = str(root / "empty_dir")
    nw = root / "no_weights"
    shutil.copytree(llama, nw)
    (nw / "model.safetensors").unlink()
    out["no_weights"] = str(nw)
    bad_cfg = root / "bad_config"
    shutil.copytree(llama, bad_cfg)
    (bad_cfg / "config.json").write_text("{not json")
    out["bad_config"] = str(bad_cfg)
    unsafe = root / "unsafe_pickle"
    shutil.copytree(llama, unsafe)
    state = load_file(str(unsafe / "model.safetensors"))
    (unsafe / "model.safetensors").unlink()
    torch.save({**state, "evil": _Evil()}, unsafe / "pytorch_model.bin")  # a booby-trapped checkpoint
    out["unsafe_pickle"] = str(unsafe)
    remote = root / "remote_code"
    shutil.copytree(llama, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                     "AutoModelForCausalLM": "modeling_my.MyLM"})
    (remote / "config.json").write_text(json.dumps(cfg))
    out["remote_code"] = str(remote)
    return out


def _bad_data(root: Path) -> dict[str, str]:
    d = {}
    d["missing"] = str(root / "nope.jsonl")
    d["txt"] = _rows(root / "data.txt", [{"prompt": W, "completion": "5."}])
    d["bad_json_line"] = _rows(root / "bad_line.jsonl", [{"prompt": W, "completion": "5."}, '{"prompt": "x", "completion": }'])
    (root / "latin1.json").write_bytes(b'[{"prompt": "caf\xe9", "completion": "5."}]')
    d["json_not_utf8"] = str(root / "latin1.json")
    (root / "latin1.csv").write_bytes(b"prompt,completion\n\"caf\xe9\",5.\n")
    d["csv_not_utf8"] = str(root / "latin1.csv")
    (root / "cells.csv").write_text("prompt,completion\nWhat is 2 + 3?,5.,extra\n")
    d["csv_cells"] = str(root / "cells.csv")
    (root / "array.json").write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    d["json_array_error"] = str(root / "array.json")
    (root / "surrogate.jsonl").write_text('{"prompt": "\\ud800 hi", "completion": "5."}\n')
    d["surrogate"] = str(root / "surrogate.jsonl")
    (root / "empty.jsonl").write_text("")
    d["empty"] = str(root / "empty.jsonl")
    d["long_prompt"] = _rows(root / "long.jsonl", [{"prompt": "long " * 100, "completion": "5."}])
    d["prefs_missing_rejected"] = _rows(root / "prefs_bad.jsonl", [{"prompt": W, "chosen": "5."}])
    d["prefs_same"] = _rows(root / "prefs_same.jsonl", [{"prompt": W, "chosen": "5.", "rejected": "5."}])
    d["prefs_long_prompt"] = _rows(root / "prefs_long.jsonl", [{"prompt": "long " * 100, "chosen": "5.", "rejected": "6."}])
    d["prompts_bad"] = _rows(root / "prompts_bad.jsonl", [{"question": W}])
    d["prompts_user"] = _rows(root / "prompts_user.jsonl", [{"prompt": "Summarise this contract for me."}])
    d["judge_user"] = _rows(root / "judge_user.jsonl", [{"prompt": "Summarise this contract for me.", "response": "No."}])
    (root / "dataset_dir").mkdir()
    d["dir_not_dataset"] = str(root / "dataset_dir")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    d["bad_yaml"] = str(root / "bad.yaml")
    (root / "typo.yaml").write_text("trian:\n  lr: 0.1\n")
    d["typo_yaml"] = str(root / "typo.yaml")
    (root / "constitution.yaml").write_text("principles: 3\n")
    d["bad_constitution"] = str(root / "constitution.yaml")
    d["cases_bad"] = _rows(root / "cases.jsonl", [{"request": ""}])
    (root / "a_file.txt").write_text("precious\n")
    d["a_file"] = str(root / "a_file.txt")
    mine = root / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious\n")
    d["my_folder"] = str(mine)
    return d


@pytest.fixture(scope="module")
def hostile(tiny_llama, tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = tmp_path_factory.mktemp("good")
    ok = {"sft": _rows(good / "sft.jsonl", [{"prompt": W, "completion": "2 + 3 = 5."}] * 8),
          "prefs": _rows(good / "prefs.jsonl", [{"prompt": W, "chosen": "2 + 3 = 5.", "rejected": "No."}] * 8),
          "prompts": _rows(good / "prompts.jsonl", [{"prompt": W}] * 8),
          "llama": str(tiny_llama), "gpt2": str(tiny_gpt2)}
    return root, {**_bad_models(root, tiny_llama), **_bad_data(root)}, ok


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# (name, argv template, what the message must contain). {b[key]} is a bad input, {g[key]} a good one,
# {out} a fresh output path.
CASES: list[tuple[str, list[str], str]] = [
    ("sft missing model", ["sft", "--data.path", "{g[sft]}", "--out", "{out}"], "--model"),
    ("sft missing data", ["sft", "--model", "{g[llama]}", "--out", "{out}"], "--data.path"),
    ("sft model not found", ["sft", "--model", "{b[missing]}", "--data.path", "{g[sft]}", "--out", "{out}"], "not found"),
    ("sft not a model folder", ["sft", "--model", "{b[not_a_model]}", "--data.path", "{g[sft]}", "--out", "{out}"], "config.json"),
    ("sft model without weights", ["sft", "--model", "{b[no_weights]}", "--data.path", "{g[sft]}", "--out", "{out}"],
     "cannot load the model in"),
    ("sft --out holds the data", ["sft", "--model", "{g[llama]}", "--data.path", "{b[long_prompt]}", "--out", "{root}"],
     "contains the run's input data.path"),
    ("eval --against missing", ["eval", "--model", "{g[llama]}", "--against", "{b[missing]}", "--out", "{out}"], "not found"),
    ("sft config.json not JSON", ["sft", "--model", "{b[bad_config]}", "--data.path", "{g[sft]}", "--out", "{out}"], "config.json:1"),
    ("sft unsafe pickle", ["sft", "--model", "{b[unsafe_pickle]}", "--data.path", "{g[sft]}", "--out", "{out}"],
     "--load.trust_remote_code"),
    ("sft custom code", ["sft", "--model", "{b[remote_code]}", "--data.path", "{g[sft]}", "--out", "{out}"],
     "--load.trust_remote_code"),
    ("sft data not found", ["sft", "--model", "{g[llama]}", "--data.path", "{b[missing]}", "--out", "{out}"], "nope.jsonl"),
    ("sft data .txt", ["sft", "--model", "{g[llama]}", "--data.path", "{b[txt]}", "--out", "{out}"], "unsupported file type"),
    ("sft bad JSON line", ["sft", "--model", "{g[llama]}", "--data.path", "{b[bad_json_line]}", "--out", "{out}"],
     "bad_line.jsonl:2"),
    ("sft .json not UTF-8", ["sft", "--model", "{g[llama]}", "--data.path", "{b[json_not_utf8]}", "--out", "{out}"],
     "latin1.json:1: not valid UTF-8"),
    ("sft .csv not UTF-8", ["sft", "--model", "{g[llama]}", "--data.path", "{b[csv_not_utf8]}", "--out", "{out}"],
     "latin1.csv:2: not valid UTF-8"),
    ("sft .csv cells", ["sft", "--model", "{g[llama]}", "--data.path", "{b[csv_cells]}", "--out", "{out}"], "cells.csv:2"),
    ("sft .json array error", ["sft", "--model", "{g[llama]}", "--data.path", "{b[json_array_error]}", "--out", "{out}"],
     "array.json:3: invalid JSON"),
    ("sft lone surrogate", ["sft", "--model", "{g[llama]}", "--data.path", "{b[surrogate]}", "--out", "{out}"],
     "surrogate.jsonl:1: field 'prompt'"),
    ("sft empty file", ["sft", "--model", "{g[llama]}", "--data.path", "{b[empty]}", "--out", "{out}"], "no valid rows"),
    ("sft not a dataset dir", ["sft", "--model", "{g[llama]}", "--data.path", "{b[dir_not_dataset]}", "--out", "{out}"],
     "save_to_disk"),
    ("sft max_length past positions", ["sft", "--model", "{g[gpt2]}", "--data.path", "{g[sft]}", "--out", "{out}",
                                       "--data.max_length", "512"], "data.max_length 512"),
    ("sft max_length past Llama positions", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{out}",
                                             "--data.max_length", "300"], "256 positions"),
    ("sft truncation error", ["sft", "--model", "{g[llama]}", "--data.path", "{b[long_prompt]}", "--out", "{out}",
                              "--data.truncation", "error", "--data.max_length", "64"], "long.jsonl:1: field 'prompt'"),
    ("sft lr negative", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{out}", "--train.lr", "-1"],
     "train.lr"),
    ("sft lr not a number", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{out}", "--train.lr", "abc"],
     "train.lr"),
    ("sft lora targets", ["sft", "--model", "{g[gpt2]}", "--data.path", "{g[sft]}", "--out", "{out}", "--lora.enabled",
                          "--lora.target_modules", "q_proj"], "c_attn"),
    ("sft lora dropout", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{out}", "--lora.dropout", "1.5"],
     "lora.dropout"),
    ("sft bad YAML", ["sft", "--config", "{b[bad_yaml]}", "--model", "{g[llama]}", "--out", "{out}"], "bad.yaml"),
    ("sft YAML typo", ["sft", "--config", "{b[typo_yaml]}", "--model", "{g[llama]}", "--out", "{out}"], "train"),
    ("sft --out a file", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{b[a_file]}"], "existing file"),
    ("sft --out a user folder", ["sft", "--model", "{g[llama]}", "--data.path", "{g[sft]}", "--out", "{b[my_folder]}"],
     "notes.txt"),
    ("sft --out the model", ["sft", "--model", "{b[no_weights]}", "--data.path", "{g[sft]}", "--out", "{b[no_weights]}"],
     "input model"),
    ("rm missing rejected", ["rm", "--model", "{g[llama]}", "--data.path", "{b[prefs_missing_rejected]}", "--out", "{out}"],
     "prefs_bad.jsonl:1"),
    ("rm identical sides", ["rm", "--model", "{g[llama]}", "--data.path", "{b[prefs_same]}", "--out", "{out}"],
     "field 'rejected'"),
    ("rm truncation error names the prompt", ["rm", "--model", "{g[llama]}", "--data.path", "{b[prefs_long_prompt]}",
                                              "--out", "{out}", "--data.truncation", "error", "--data.max_length", "64"],
     "prefs_long.jsonl:1: field 'prompt'"),
    ("rm max_length past positions", ["rm", "--model", "{g[gpt2]}", "--data.path", "{g[prefs]}", "--out", "{out}",
                                      "--data.max_length", "1024"], "data.max_length 1024"),
    ("rm ensemble 0", ["rm", "--model", "{g[llama]}", "--data.path", "{g[prefs]}", "--out", "{out}", "--ensemble", "0"],
     "ensemble"),
    ("rm --out a file", ["rm", "--model", "{g[llama]}", "--data.path", "{g[prefs]}", "--out", "{b[a_file]}"], "existing file"),
    ("rm negative margin weight", ["rm", "--model", "{g[llama]}", "--data.path", "{g[prefs]}", "--out", "{out}",
                                  "--loss.margin_weight", "-1"], "margin_weight"),
    ("ppo lr 0", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{g[llama]}", "--prompts", "{g[prompts]}", "--out", "{out}",
                  "--lr", "0"], "ppo.lr"),
    ("ppo critic_lr negative", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{g[llama]}", "--prompts", "{g[prompts]}",
                                "--out", "{out}", "--critic_lr=-1e-5"], "ppo.critic_lr"),
    ("ppo vf_coef negative", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{g[llama]}", "--prompts", "{g[prompts]}",
                              "--out", "{out}", "--vf_coef", "-1"], "ppo.vf_coef"),
    ("ppo bad prompts", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{g[llama]}", "--prompts", "{b[prompts_bad]}",
                         "--out", "{out}"], "prompts_bad.jsonl:1"),
    ("ppo reward model missing", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{b[missing]}", "--prompts",
                                  "{g[prompts]}", "--out", "{out}"], "not found"),
    ("ppo --out a user folder", ["ppo", "--policy", "{g[llama]}", "--reward_model", "{g[llama]}", "--prompts", "{g[prompts]}",
                                 "--out", "{b[my_folder]}"], "notes.txt"),
    ("ppo max_new_tokens past positions", ["ppo", "--policy", "{g[gpt2]}", "--reward_model", "{g[gpt2]}", "--prompts",
                                           "{g[prompts]}", "--out", "{out}", "--generation.max_new_tokens", "400"],
     "generation.max_new_tokens"),
    ("collect non-world prompts", ["collect", "--policy", "{g[llama]}", "--prompts", "{b[prompts_user]}", "--out", "{out}"],
     "prompts_user.jsonl:1"),
    ("collect unknown annotator", ["collect", "--policy", "{g[llama]}", "--prompts", "{g[prompts]}", "--out", "{out}",
                                   "--annotators", "nobody"], "collect.annotators"),
    ("collect --out a folder", ["collect", "--policy", "{g[llama]}", "--prompts", "{g[prompts]}", "--out", "{b[my_folder]}"],
     "is a folder"),
    ("eval --out a folder", ["eval", "--model", "{g[llama]}", "--out", "{b[my_folder]}"], "is a folder"),
    ("eval --out a user file", ["eval", "--model", "{g[llama]}", "--out", "{b[a_file]}", "--overwrite"], "did not write"),
    ("eval model missing", ["eval", "--model", "{b[missing]}", "--out", "{out}"], "not found"),
    ("eval bad prompts", ["eval", "--model", "{g[llama]}", "--prompts", "{b[bad_json_line]}", "--out", "{out}"],
     "bad_line.jsonl:2"),
    ("eval bad constitution", ["eval", "--model", "{g[llama]}", "--constitution", "{b[bad_constitution]}", "--out", "{out}"],
     "constitution.yaml"),
    ("eval n_prompts 0", ["eval", "--model", "{g[llama]}", "--out", "{out}", "--n_prompts", "0"], "n_prompts"),
    ("eval-rm bad data", ["eval-rm", "--model", "{g[llama]}", "--data", "{b[prefs_missing_rejected]}", "--out", "{out}"],
     "prefs_bad.jsonl:1"),
    ("eval-rm --out a folder", ["eval-rm", "--model", "{g[llama]}", "--data", "{g[prefs]}", "--out", "{b[my_folder]}"],
     "is a folder"),
    ("eval-rm max_length past positions", ["eval-rm", "--model", "{g[gpt2]}", "--data", "{g[prefs]}", "--out", "{out}",
                                           "--max_length", "300"], "max_length 300"),
    ("redteam bad cases", ["redteam", "--model", "{g[llama]}", "--cases", "{b[cases_bad]}", "--out", "{out}"], "cases.jsonl"),
    ("redteam unknown strategy", ["redteam", "--model", "{g[llama]}", "--strategies", "telepathy", "--out", "{out}"],
     "telepathy"),
    ("redteam --out a file", ["redteam", "--model", "{g[llama]}", "--out", "{b[a_file]}"], "existing file"),
    ("redteam repeats 0", ["redteam", "--model", "{g[llama]}", "--out", "{out}", "--repeats", "0"], "repeats"),
    ("world --out a file", ["world", "--out", "{b[a_file]}"], "existing file"),
    ("world --out a user folder", ["world", "--out", "{b[my_folder]}"], "notes.txt"),
    ("world n_pretrain 0", ["world", "--out", "{out}", "--n_pretrain", "0"], "n_pretrain"),
    ("world judge bad file", ["world", "judge", "{b[bad_json_line]}"], "bad_line.jsonl:1"),
    ("world judge non-world prompt", ["world", "judge", "{b[judge_user]}"], "judge_user.jsonl:1: field 'prompt'"),
    ("pretrain corpus missing", ["pretrain", "--corpus", "{b[missing]}", "--out", "{out}"], "nope.jsonl"),
    ("pretrain corpus bad rows", ["pretrain", "--corpus", "{b[prompts_bad]}", "--out", "{out}"], "prompts_bad.jsonl:1"),
    ("pretrain vocab too small", ["pretrain", "--corpus", "{g[sft]}", "--out", "{out}", "--tokenizer.vocab_size", "10"],
     "vocab_size"),
    ("pretrain --out a file", ["pretrain", "--corpus", "{g[sft]}", "--out", "{b[a_file]}"], "existing file"),
    ("run --out a user folder", ["run", "--out", "{b[my_folder]}"], "notes.txt"),
    ("run bad YAML", ["run", "--config", "{b[bad_yaml]}", "--out", "{out}"], "bad.yaml"),
    ("report not a run", ["report", "{b[my_folder]}"], "my_folder"),
    ("experiment --out a user folder", ["experiment", "seeds", "--out", "{b[my_folder]}"], "notes.txt"),
    ("annotate export --out a folder", ["annotate", "export", "--db", "{out}.db", "--out", "{b[my_folder]}"], "is a folder"),
]


def test_sweep_covers_every_command():
    commands = {argv[0] for _, argv, _ in CASES}
    assert commands == {"sft", "rm", "ppo", "collect", "eval", "eval-rm", "redteam", "world", "pretrain", "run",
                        "report", "experiment", "annotate"}
    assert len(CASES) >= 60


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(hostile, tmp_path, capsys, name, argv, expect):
    root, bad, good = hostile
    before = _digest(root)
    args = [a.format(b=bad, g=good, out=tmp_path / "out", root=root) for a in argv]
    code = main(args)  # an exception here is the traceback a user would have seen
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"rlhf {args[0]}: error:" in err and "Traceback" not in err
    assert expect in err, err
    assert _digest(root) == before  # nothing of the user's was changed or deleted
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
