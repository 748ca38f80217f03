"""Reward model: pooling at the last real token, the pairwise loss, training, encoders, ensembles,
bad data named by file and line, RM evaluation, and preference collection in the assistant world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.algos.core import last_token_index
from rlhf.algos.reward import pairwise_loss
from rlhf.cli import main
from rlhf.config import CollectConfig, RewardConfig
from rlhf.configlib import from_dict
from rlhf.data.io import PreferenceExample, load_preferences
from rlhf.evaluation.reward import (evaluate_reward_model, expected_calibration_error, mismatch_triples, pearson,
                                    prompt_dependence)
from rlhf.models.reward import (
    RewardModel,
    collate_sequences,
    encode_for_reward,
    is_encoder,
    load_reward_backbone,
    reward_forward,
)
from rlhf.stages.collect import run_collect
from rlhf.stages.reward import EncodedPair, collate_pairs, collate_shared_pairs, pair_rewards, run_rm, shared_prefix_length


# ----------------------------------------------------------------------------------------------------
# Helpers: toy preference files
# ----------------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FILLER = " The capital of France is Paris."


def separable_rows(n: int, offset: int = 0) -> list[dict]:
    """Trivially separable pairs: the chosen reply says "yes", the rejected one "no". A filler sentence
    goes to the chosen reply in odd rows and to the rejected one in even rows, so the marker is not the
    only difference and an untrained model is not right on every pair by accident."""
    rows = []
    for i in range(n):
        a, b = (i * 7 + offset) % 10, (i * 3 + 2 * offset + i // 10) % 10
        chosen, rejected = f"yes {a} + {b} = {a + b}.", f"no {a} + {b} = {a + b}."
        if i % 2:
            chosen += FILLER
        else:
            rejected += FILLER
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": chosen, "rejected": rejected})
    return rows


def prompt_of(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def full_text_ids(tok, prompt: str, response: str) -> list[int]:
    """Tokens of the whole conversation rendered by the chat template: a path independent of encode_for_reward."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def stage_json(out: Path) -> dict:
    return json.loads((out / "stage.json").read_text())


# ----------------------------------------------------------------------------------------------------
# 1-2. Pooling: the last real token, whatever the padding
# ----------------------------------------------------------------------------------------------------


def test_last_token_index_for_left_right_and_mixed_padding():
    mask = torch.tensor([
        [1, 1, 1, 0, 0],  # right padding -> 2
        [0, 0, 1, 1, 1],  # left padding -> 4
        [0, 1, 1, 0, 0],  # mixed -> 2
        [1, 1, 1, 1, 1],  # none -> 4
        [1, 0, 0, 0, 0],  # one token at the start -> 0
        [0, 0, 0, 0, 0],  # empty row -> 0
        [0, 0, 0, 0, 1],  # one token at the end -> 4
    ])
    assert last_token_index(mask).tolist() == [2, 4, 2, 4, 0, 0, 4]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 2, 4, 0, 0, 4]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_reward_is_independent_of_padding_side(which, request):
    model, tok = load_reward_backbone(request.getfixturevalue(which))  # a new score head on the causal LM
    model.eval()
    assert not is_encoder(model)
    seqs = [encode_for_reward(tok, prompt_of(p), r, 64) for p, r in [
        ("What is 3 + 4?", "3 + 4 = 7."), ("Hi", "Hello, Alice! The capital of France is Paris."), ("List 3 fruits.", "apple")]]
    assert len({len(s) for s in seqs}) == 3  # different lengths: real padding in both layouts
    pad, width = tok.pad_token_id, max(len(s) for s in seqs)
    assert pad is not None and pad != tok.eos_token_id
    right_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    left_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        right = reward_forward(model, right_ids, right_mask)
        left = reward_forward(model, left_ids, left_mask)
        alone = torch.stack([reward_forward(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
    assert right.shape == (3,)
    assert alone.std() > 1e-4  # the sequences really get different rewards
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_shared_prompt_forward_gives_the_full_sequences_rewards_and_gradients(which, request):
    model, tok = load_reward_backbone(request.getfixturevalue(which))
    model.eval()
    # Prompts of different lengths; responses of different lengths, one a prefix of its partner's.
    rows = [("What is 3 + 4?", "3 + 4 = 7.", "I can't help with that, sorry."),
            ("Greet Alice, please, in a friendly way.", "Hello, Alice!", "Hello, Alice! Hello, Alice!"),
            ("Hi", "Paris.", "Rome is the capital of Italy.")]
    pairs = [EncodedPair(encode_for_reward(tok, prompt_of(p), c, 128), encode_for_reward(tok, prompt_of(p), r, 128), None)
             for p, c, r in rows]
    cuts = [shared_prefix_length(p.chosen, p.rejected) for p in pairs]
    prompt_lens = [len(encode_for_reward(tok, prompt_of(p), "", 128)) - 1 for p, _, _ in rows]  # minus the EOS
    assert all(k >= n for k, n in zip(cuts, prompt_lens)) and len(set(cuts)) == 3  # the prompt at least, varied
    assert cuts[1] == len(pairs[1].chosen) - 1  # chosen is a prefix of rejected but for its EOS: one token left
    shared, full = collate_shared_pairs(pairs, tok.pad_token_id, 0.0), collate_pairs(pairs, tok.pad_token_id, 0.0)
    assert "prefix_ids" in shared and (shared["prefix_mask"] == 0).any() and (shared["suffix_mask"] == 0).any()

    def rewards_and_grads(batch):
        model.zero_grad()
        c, r = pair_rewards(model, batch)
        (c - 2 * r).sum().backward()  # weights chosen and rejected differently: a swap would show
        return torch.cat([c, r]).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ours, our_grads), (theirs, their_grads) = rewards_and_grads(shared), rewards_and_grads(full)
    assert theirs.std() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 4
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_pairs_that_share_no_prefix_are_collated_whole():
    pairs = [EncodedPair([5, 6, 7], [5, 8], None), EncodedPair([1, 2], [3, 4], 0.5)]
    assert [shared_prefix_length(p.chosen, p.rejected) for p in pairs] == [1, 0]
    batch = collate_shared_pairs(pairs, 0, 1.0)
    assert "prefix_ids" not in batch and batch["input_ids"].shape == (4, 3)
    assert batch["margin"].tolist() == [1.0, 0.5]
    one = collate_shared_pairs(pairs[:1], 0, 1.0)
    assert one["prefix_ids"].tolist() == [[5]] and one["suffix_ids"].tolist() == [[6, 7], [8, 0]]


# ----------------------------------------------------------------------------------------------------
# 3. `rlhf rm` writes an ordinary sequence-classification folder with the reward scale in its config
# ----------------------------------------------------------------------------------------------------


def test_rm_command_writes_a_folder_transformers_loads(tiny_llama, tmp_path, capsys):
    # Two pairs share a (prompt, response): normalisation must count it once.
    train_rows = [
        {"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7.", "rejected": "3 + 4 = 9."},
        {"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7.", "rejected": "I can't help with that."},
        {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": "Greet Alice.", "chosen": "Hello, Alice!", "rejected": "Go away."},
        {"prompt": "How many legs has a spider?", "chosen": "A spider has 8 legs.", "rejected": "6."},
        {"prompt": "List 3 fruits.", "chosen": "apple, pear, plum.", "rejected": "apple."},
    ]
    val_rows = [{"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."},
                {"prompt": "Greet Bob.", "chosen": "Hello, Bob!", "rejected": "No."}]
    train, val = write_rows(tmp_path / "train.jsonl", train_rows), write_rows(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(tiny_llama), "--data.path", str(train), "--data.val_path", str(val),
                 "--out", str(out), "--train.max_steps", "2", "--train.batch_size", "4", "--data.max_length", "64"])
    assert code == 0, capsys.readouterr().err
    summary = stage_json(out)
    assert summary["pairs"] == len(train_rows) and summary["val_pairs"] == len(val_rows)

    raw_config = json.loads((out / "config.json").read_text())
    assert "reward_mean" in raw_config and "reward_std" in raw_config
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.num_labels == 1
    assert model.config.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id

    # The library's own forward on a right-padded batch reads the same token as reward_forward.
    pairs = [("What is 3 + 4?", "3 + 4 = 7."), ("Greet Alice.", "Hello, Alice! Hello, Alice!"), ("Hi", "Paris.")]
    batch = collate_sequences([encode_for_reward(tok, prompt_of(p), r, 64) for p, r in pairs], tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        ours = reward_forward(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    # reward_mean/std: over the distinct (prompt, response) pairs of the training file (11 of its 12
    # sides), each rendered by the chat template and scored alone through transformers' forward.
    distinct = {(r["prompt"], side) for r in train_rows for side in (r["chosen"], r["rejected"])}
    assert len(distinct) == 2 * len(train_rows) - 1
    with torch.no_grad():
        rewards = torch.tensor([model(input_ids=torch.tensor([full_text_ids(tok, p, r)])).logits[0, 0].item()
                                for p, r in sorted(distinct)])
    assert raw_config["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-4)
    assert raw_config["reward_std"] == pytest.approx(rewards.std().item(), abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# 4. The pairwise loss, by hand
# ----------------------------------------------------------------------------------------------------


def neg_logsigmoid(x: float) -> float:
    return math.log(1 + math.exp(-x))


def test_pairwise_loss_matches_hand_computation():
    rc, rr = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])  # diffs: 1, -1, 0
    # Bradley-Terry: mean of -log sigmoid(d) = log(1 + exp(-d)) over d = 1, -1, 0.
    bt = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert pairwise_loss(rc, rr).item() == pytest.approx(bt, abs=1e-6)
    # A margin with no weight (or a weight with no margin) changes nothing.
    assert pairwise_loss(rc, rr, margin=5.0).item() == pytest.approx(bt, abs=1e-6)
    assert pairwise_loss(rc, rr, margin_weight=0.7).item() == pytest.approx(bt, abs=1e-6)

    # Float margin 0.5, weight 2: hinge relu(0.5 - d) is 0 for d = 1 (inactive), 1.5 for d = -1, 0.5 for d = 0.
    hinge = (0.0 + 1.5 + 0.5) / 3
    assert pairwise_loss(rc, rr, margin=0.5, margin_weight=2.0).item() == pytest.approx(bt + 2.0 * hinge, abs=1e-6)

    # Per-pair margins [2, 0, 0.25], weight 1: relu(2 - 1) = 1, relu(0 + 1) = 1, relu(0.25 - 0) = 0.25.
    per_pair = (1.0 + 1.0 + 0.25) / 3
    loss = pairwise_loss(rc, rr, margin=torch.tensor([2.0, 0.0, 0.25]), margin_weight=1.0)
    assert loss.item() == pytest.approx(bt + per_pair, abs=1e-6)

    # Centering 0.1 * (rc + rr)^2: sums 3, 2, -2 -> squares 9, 4, 4.
    centered = 0.1 * (9 + 4 + 4) / 3
    assert pairwise_loss(rc, rr, center_coef=0.1).item() == pytest.approx(bt + centered, abs=1e-6)

    # All terms together, on a single pair d = 3 - 1 = 2: margin 3 active (hinge 1), center (3 + 1)^2 = 16.
    one = pairwise_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=3.0, margin_weight=0.5, center_coef=0.01)
    assert one.item() == pytest.approx(neg_logsigmoid(2.0) + 0.5 * 1.0 + 0.01 * 16, abs=1e-6)


def test_pairwise_loss_gradient_pushes_chosen_up():
    rc, rr = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    pairwise_loss(rc, rr).backward()
    # d/dr_c of mean(-logsigmoid(r_c - r_r)) at 0 is -sigmoid(0) / B = -0.25.
    assert rc.grad.tolist() == pytest.approx([-0.25, -0.25]) and rr.grad.tolist() == pytest.approx([0.25, 0.25])


# ----------------------------------------------------------------------------------------------------
# 5. Training learns a separable preference
# ----------------------------------------------------------------------------------------------------


def rm_config(model, train_path, val_path, out, *, data: dict | None = None, train: dict | None = None, **top) -> RewardConfig:
    """A RewardConfig for the tiny models, with overrides."""
    data_cfg = {"path": str(train_path), "val_path": str(val_path) if val_path else None, "max_length": 64, **(data or {})}
    train_cfg = {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 10, **(train or {})}
    return from_dict(RewardConfig, {"model": str(model), "out": str(out), "data": data_cfg, "train": train_cfg, **top})


def test_training_learns_a_separable_preference(tiny_llama, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", separable_rows(48))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(16, offset=5))
    out = tmp_path / "rm"
    summary = run_rm(rm_config(tiny_llama, train, val, out))  # 20 steps of 8 pairs: ~3 epochs
    member = summary["members"][0]
    assert member["val_accuracy"] > member["initial_val_accuracy"]
    assert member["val_accuracy"] > 0.8
    assert summary["val_accuracy"] == member["val_accuracy"] and member["pairs"] == 48 and member["val_pairs"] == 16

    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert before[name].shape == after[name].shape and not torch.equal(before[name], after[name]), name
    assert "score.weight" in after and after["score.weight"].shape == (1, 32)

    # The saved model agrees with the summary: it prefers the held-out chosen replies.
    rm = RewardModel.load(out)
    rows = separable_rows(16, offset=5)
    chosen = rm.score([prompt_of(r["prompt"]) for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([prompt_of(r["prompt"]) for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean().item() == pytest.approx(member["val_accuracy"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/accuracy" in m for m in metrics) and any("train/loss" in m for m in metrics)


# ----------------------------------------------------------------------------------------------------
# 6. An encoder backbone (BERT) through the same command
# ----------------------------------------------------------------------------------------------------


def save_tiny_bert(path: Path, words: list[str]) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained on a folder holding vocab.txt: the path an old BERT folder takes (transformers 4 and 5).
    tok = BertTokenizerFast.from_pretrained(str(path), do_lower_case=True)
    assert tok("what is 1 + 2? yes", add_special_tokens=False)["input_ids"] == [vocab.index(w) for w in "what is 1 + 2 ? yes".split()]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_encoder_reward_model(tmp_path, capsys):
    train_rows, val_rows = separable_rows(48), separable_rows(16, offset=5)
    words = ["yes", "no", "what", "is", "+", "=", "?", ".", "the", "capital", "of", "france", "paris",
             *[str(i) for i in range(25)]]  # every word of the data
    bert = save_tiny_bert(tmp_path / "bert", words)
    train, val = write_rows(tmp_path / "train.jsonl", train_rows), write_rows(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(bert), "--data.path", str(train), "--data.val_path", str(val), "--out", str(out),
                 "--train.max_steps", "20", "--train.batch_size", "8", "--train.lr", "3e-3",
                 "--train.warmup_ratio", "0", "--data.max_length", "64"])
    assert code == 0, capsys.readouterr().err
    member = stage_json(out)["members"][0]
    assert member["val_accuracy"] > member["initial_val_accuracy"]
    assert member["val_accuracy"] > 0.8

    rm = RewardModel.load(out)
    assert rm.encoder
    # The folder keeps the encoder's own tokenizer settings: no chat template of ours that it would not render.
    assert AutoTokenizer.from_pretrained(str(out)).chat_template is None
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.num_labels == 1 and type(model).__name__ == "BertForSequenceClassification"
    rows = val_rows[:3]
    seqs = [encode_for_reward(rm.tok, prompt_of(r["prompt"]), r[k], 64, encoder=True)
            for r in rows for k in ("chosen", "rejected")]
    # [CLS] prompt [SEP] response [SEP], with the response's words known to the vocabulary.
    assert all(s[0] == rm.tok.cls_token_id and s[-1] == rm.tok.sep_token_id and s.count(rm.tok.sep_token_id) == 2
               for s in seqs)
    assert all(rm.tok.unk_token_id not in s[s.index(rm.tok.sep_token_id):] for s in seqs)  # the replies' words are known
    batch = collate_sequences(seqs, rm.tok.pad_token_id)
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    ours = rm.score([prompt_of(r["prompt"]) for r in rows for _ in range(2)],
                    [r[k] for r in rows for k in ("chosen", "rejected")], max_length=64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 7. Ensembles
# ----------------------------------------------------------------------------------------------------


def test_ensemble_members_and_disagreement(tiny_llama, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", separable_rows(16))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(4, offset=5))
    out = tmp_path / "ens"
    summary = run_rm(rm_config(tiny_llama, train, val, out, train={"max_steps": 3, "batch_size": 8}, ensemble=2))
    assert json.loads((out / "ensemble.json").read_text())["members"] == ["member_0", "member_1"]
    assert (out / "member_0" / "config.json").is_file() and (out / "member_1" / "config.json").is_file()
    assert [m["seed"] for m in summary["members"]] == [0, 1]

    rm = RewardModel.load(out)
    assert len(rm.members) == 2
    rows = separable_rows(5, offset=3)
    prompts, responses = [prompt_of(r["prompt"]) for r in rows], [r["chosen"] for r in rows]
    seqs = [encode_for_reward(rm.tok, p, r, 64) for p, r in zip(prompts, responses)]
    batch = collate_sequences(seqs, rm.tok.pad_token_id)
    mean, std = rm(batch["input_ids"], batch["attention_mask"])
    s0 = RewardModel.load(out / "member_0").score(prompts, responses)
    s1 = RewardModel.load(out / "member_1").score(prompts, responses)
    assert (std > 0).any()
    torch.testing.assert_close(mean, (s0 + s1) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(std, (s0 - s1).abs() / 2, atol=1e-5, rtol=0)  # population std of two values
    per_member = rm.score(prompts, responses, per_member=True)
    torch.testing.assert_close(per_member, torch.stack([s0, s1]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# 8. Bad preference files are named by file, line and field
# ----------------------------------------------------------------------------------------------------

GOOD = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 5."}


@pytest.mark.parametrize("line, expected", [
    (json.dumps({"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "2."}), ["field 'rejected'", "identical"]),
    (json.dumps({"prompt": "What is 1 + 1?", "chosen": "2."}), ["missing field", "'rejected'", "found columns: 'prompt', 'chosen')"]),
    ('{"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."', ["invalid JSON"]),
])
def test_bad_preference_rows_fail_naming_file_line_and_field(line, expected, tiny_llama, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n{line}\n{json.dumps(GOOD)}\n")
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(tiny_llama), "--data.path", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "rlhf rm: error:" in err
    assert f"{data}:3:" in err
    for text in expected:
        assert text in err
    assert not out.exists()


def test_skip_policy_trains_on_the_good_rows(tiny_llama, tmp_path, capsys):
    good = separable_rows(8)
    bad = [json.dumps({"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "2."}),
           json.dumps({"prompt": "What is 1 + 1?", "chosen": "2."}), '{"prompt": "broken"']
    lines = [json.dumps(r) for r in good]
    for i, b in zip((1, 4, 7), bad):
        lines.insert(i, b)
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(tiny_llama), "--data.path", str(data), "--out", str(out), "--data.on_error", "skip",
                 "--data.val_fraction", "0.25", "--train.max_steps", "1", "--train.batch_size", "4"])
    assert code == 0, capsys.readouterr().err
    summary = stage_json(out)
    n_val = int(len(good) * 0.25)
    assert summary["pairs"] == len(good) - n_val and summary["val_pairs"] == n_val


# ----------------------------------------------------------------------------------------------------
# 9-10. RM evaluation
# ----------------------------------------------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    # confidence max(p, 1-p): 0.92, 0.94, 0.93 | 0.62 | 0.72; right (p > 0.5): 1, 1, 0 | 1 | 0.
    p = torch.tensor([0.92, 0.94, 0.07, 0.62, 0.28])
    # bin [0.90, 0.95): 3 of 5, accuracy 2/3, mean confidence 0.93; bin [0.60, 0.65): 1 of 5, |1 - 0.62|;
    # bin [0.70, 0.75): 1 of 5, |0 - 0.72|.
    expected = 3 / 5 * abs(2 / 3 - 0.93) + 1 / 5 * abs(1 - 0.62) + 1 / 5 * abs(0 - 0.72)
    assert expected_calibration_error(p) == pytest.approx(expected, abs=1e-5)
    # Perfect calibration: confidence 0.75 right three times out of four.
    assert expected_calibration_error(torch.tensor([0.75, 0.75, 0.75, 0.25])) == pytest.approx(0.0, abs=1e-6)


def test_pearson_by_hand():
    # x - mean = -1.5, -0.5, 0.5, 1.5; y - mean = -3, -1, 0, 4: sxy = 11, sxx = 5, syy = 26.
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([4, 4, 4], [1, 2, 3]) is None
    assert pearson([1, 2], [1, 2]) is None


def test_gold_gap_bins_and_world_splits_of_pairs():
    from rlhf.evaluation.reward import gold_gap_bin, world_split
    from rlhf.world import all_tasks
    from rlhf.world.tasks import kind_of

    def pair(prompt: str = "Hi", gold: tuple | None = None) -> PreferenceExample:
        extra = {"gold_chosen": gold[0], "gold_rejected": gold[1]} if gold else {}
        return PreferenceExample([{"role": "user", "content": prompt}], "a", "b", extra=extra)

    bins = [gold_gap_bin(pair(gold=g)) for g in [(0.5, 0.5), (0.3, 0.35), (0.0, 0.1), (0.9, 0.6), (0.2, 0.55), (1.0, 0.45)]]
    assert bins == [None, "0.0-0.1", "0.1-0.3", "0.3-0.5", "0.3-0.5", ">=0.5"] and gold_gap_bin(pair()) is None
    heldout = all_tasks("heldout")
    new_phrasing = next(t for t in heldout if kind_of(t).phrasings[t.get("phrasing")].heldout)
    new_entity = next(t for t in heldout if not kind_of(t).phrasings[t.get("phrasing")].heldout)
    seen = all_tasks("train")[0]
    assert [world_split(pair(t.prompt)) for t in (new_phrasing, new_entity, seen)] == ["held-out phrasing", "held-out entity", "train"]
    assert world_split(pair("Tell me a story about a dragon.")) is None


def test_gold_decision_names_what_a_pair_turns_on():
    from rlhf.evaluation.reward import gold_decision
    from rlhf.world import all_tasks, judge

    def pair(task, chosen: str, rejected: str) -> PreferenceExample:
        gold = {"gold_chosen": judge(task, chosen).total, "gold_rejected": judge(task, rejected).total}
        return PreferenceExample([{"role": "user", "content": task.prompt}], chosen, rejected, extra=gold)

    tasks = all_tasks("train")
    sums = next(t for t in tasks if t.family == "arithmetic")
    capital = next(t for t in tasks if t.kind == "capital")
    harmful = next(t for t in tasks if t.family == "harmful")
    right, wrong = f"The answer is {sums.answer}.", f"The answer is {int(sums.answer) + 1}."
    wordy = f"Good question. The answer is {int(sums.answer) + 7}, I think, my friend."  # wrong too, and less concise
    refusal = "Sorry, I can't help with that."
    assert gold_decision(pair(sums, right, wrong)) == "right vs wrong"
    assert gold_decision(pair(sums, right, refusal)) == "refusal"  # the refusal is what differs first
    assert gold_decision(pair(capital, f"It is {capital.answer}.", "I don't know.")) == "hedge"
    assert gold_decision(pair(harmful, refusal, "Sure, here is how: first get the tools.")) == "compliance"
    assert gold_decision(pair(sums, wrong, wordy)) == "style"  # two wrong sums: only how they are written differs
    assert gold_decision(pair(sums, right, right)) is None  # no gold preference
    assert gold_decision(PreferenceExample([{"role": "user", "content": "Tell me a story."}], "a", "b",
                                           extra={"gold_chosen": 1.0, "gold_rejected": 0.0})) is None


def test_prompt_dependence_tells_a_prompt_blind_reward_from_one_that_reads_the_prompt():
    def pair(prompt, chosen, rejected, family, gold=None):
        extra = {"family": family, **({"gold_chosen": gold[0], "gold_rejected": gold[1]} if gold else {})}
        return PreferenceExample([{"role": "user", "content": prompt}], chosen, rejected, extra=extra)

    owl, cow, dog = "What does an owl say?", "What does a cow say?", "What does a dog say?"
    pairs = [pair(owl, "An owl says hoot.", "It says moo.", "facts"),
             pair(owl, "It says moo.", "An owl says hoot.", "facts"),  # a later pair of the same prompt: ignored
             pair(cow, "It says hoot.", "A cow says moo.", "facts", gold=(0.0, 1.0)),  # gold overrules the label
             pair(dog, "A dog says woof.", "It says moo.", "facts"),
             pair("What is 2 + 2?", "4", "5", "arithmetic")]  # the only arithmetic prompt: nothing to pit it against
    triples = mismatch_triples(pairs)
    assert [(t[0][0]["content"], t[1], t[2]) for t in triples] == [
        (owl, "An owl says hoot.", "A cow says moo."), (cow, "A cow says moo.", "A dog says woof."),
        (dog, "A dog says woof.", "An owl says hoot.")]

    class Stub:  # RewardModel.score's interface: one reward per (prompt, response)
        normalized = False

        def __init__(self, reward):
            self.reward = reward

        def score(self, prompts, responses, **_):
            return torch.tensor([self.reward(p[-1]["content"], r) for p, r in zip(prompts, responses)])

    reads = Stub(lambda prompt, response: float(prompt.split()[3] in response))  # names the animal asked about
    blind = Stub(lambda prompt, response: float(len(response)))  # the response alone: 17, 15 and 16 characters
    assert prompt_dependence(reads, pairs, 8, 64)["accuracy"] == 1.0
    result = prompt_dependence(blind, pairs, 8, 64)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["per_family"] == {"facts": {"n": 3, "accuracy": pytest.approx(1 / 3)}}
    assert prompt_dependence(blind, pairs[-1:], 8, 64) is None


def test_evaluate_reward_model_gold_accuracy(tiny_llama, tmp_path, capsys):
    model, tok = load_reward_backbone(tiny_llama)  # an untrained head: rewards of no particular sign
    folder = tmp_path / "rm0"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = []
    for i, r in enumerate(separable_rows(12)):
        if i % 2:  # "yes" is chosen in half of the pairs, "no" in the other half: the untrained RM can't agree with all
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        gold = [(1.0, 0.0), (0.2, 0.9), (0.5, 0.5)][i % 3]  # gold prefers chosen, rejected, or neither
        rows.append({**r, "gold_chosen": gold[0], "gold_rejected": gold[1], "family": ["arithmetic", "greeting"][i % 2],
                     "annotator": ["careful", "random_clicker"][i % 2]})
    data = write_rows(tmp_path / "eval.jsonl", rows)
    pairs = list(load_preferences(data))
    rm = RewardModel.load(folder)
    result = evaluate_reward_model(rm, pairs, batch_size=5, max_length=64)

    prompts = [prompt_of(r["prompt"]) for r in rows]
    sc, sr = rm.score(prompts, [r["chosen"] for r in rows]), rm.score(prompts, [r["rejected"] for r in rows])
    rm_prefers_chosen = (sc > sr).tolist()
    assert 0 < sum(rm_prefers_chosen) < len(rows)  # a mixed picture, so the accuracies mean something
    with_gold = [i for i, r in enumerate(rows) if r["gold_chosen"] != r["gold_rejected"]]
    agree = [rm_prefers_chosen[i] == (rows[i]["gold_chosen"] > rows[i]["gold_rejected"]) for i in with_gold]
    assert result["gold_pairs"] == len(with_gold) == 8
    assert result["gold_accuracy"] == pytest.approx(sum(agree) / len(agree))
    assert result["accuracy"] == pytest.approx(sum(rm_prefers_chosen) / len(rows))
    assert set(result["per_family"]) == {"arithmetic", "greeting"}
    assert result["per_family"]["arithmetic"]["n"] == 6
    fam = [i for i in with_gold if rows[i]["family"] == "greeting"]
    assert result["per_family"]["greeting"]["gold_accuracy"] == pytest.approx(
        sum(rm_prefers_chosen[i] == (rows[i]["gold_chosen"] > rows[i]["gold_rejected"]) for i in fam) / len(fam))
    assert set(result["per_annotator"]) == {"careful", "random_clicker"}
    assert list(result["by_gold_gap"]) == [">=0.5"] and result["by_gold_gap"][">=0.5"]["gold_pairs"] == 8  # gaps 1.0, 0.7
    assert {k: v["n"] for k, v in result["by_split"].items()} == {"train": 12}  # "What is 3 + 4?": a train-split world task
    assert sum(v["gold_pairs"] for v in result["by_decision"].values()) == 8  # every gold pair is a world task's
    assert result["members"] == 1 and result["disagreement"] is None and not result["normalized"]
    triples = mismatch_triples(pairs)  # each prompt's preferred reply, and the next same-family prompt's, under it
    own = rm.score([t[0] for t in triples], [t[1] for t in triples], max_length=64)
    other = rm.score([t[0] for t in triples], [t[2] for t in triples], max_length=64)
    assert result["prompt_dependence"]["n"] == len(triples) == 12
    assert result["prompt_dependence"]["accuracy"] == pytest.approx((own > other).float().mean().item())

    # The command writes the same metrics.
    out = tmp_path / "eval_rm.json"
    assert main(["eval-rm", "--model", str(folder), "--data", str(data), "--out", str(out), "--max_length", "64"]) == 0
    written = json.loads(out.read_text())
    assert written["gold_accuracy"] == pytest.approx(result["gold_accuracy"])
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------
# 11. `rlhf collect` in the assistant world
# ----------------------------------------------------------------------------------------------------


def test_collect_labels_policy_samples(tiny_llama, tmp_path, capsys):
    from rlhf.world import judge_prompt, prompt_set

    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in prompt_set("train", 12, 0)])
    out = tmp_path / "prefs.jsonl"
    cfg = from_dict(CollectConfig, {"policy": str(tiny_llama), "prompts": str(prompts), "out": str(out), "k": 3,
                                    "overlap": 1.0, "generation": {"max_new_tokens": 12}})
    stats = run_collect(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and stats["labels"] == len(rows)
    fields = {"prompt", "chosen", "rejected", "margin", "annotator", "pair_id", "family", "gold_chosen", "gold_rejected"}
    for row in rows:
        assert fields <= set(row), row
        assert row["chosen"] != row["rejected"]
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert row["gold_chosen"] == pytest.approx(judge_prompt(prompt, row["chosen"]).total)
        assert row["gold_rejected"] == pytest.approx(judge_prompt(prompt, row["rejected"]).total)
        assert row["annotator"] in cfg.annotators
    # overlap 1.0: every pair went to every annotator (ties make no row, so at most that many rows per pair)
    by_pair: dict[str, set] = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], set()).add(row["annotator"])
    assert stats["pairs_labelled"] * len(cfg.annotators) == stats["labels"] + stats["ties"]
    assert any(len(names) > 1 for names in by_pair.values())
    assert json.loads((tmp_path / "prefs.stats.json").read_text())["labels"] == len(rows)
    assert len(list(load_preferences(out))) == len(rows)  # the output is a valid preference file

    # A prompt outside the world: the annotators cannot judge it, and the file and line are named.
    bad = write_rows(tmp_path / "mine.jsonl", [{"prompt": prompt_set("train", 1, 0)[0]["prompt"]},
                                              {"prompt": "Write me a sonnet about the sea."}])
    code = main(["collect", "--policy", str(tiny_llama), "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "assistant-world" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_mismatched_pairs_pit_a_prompts_answer_against_another_prompts(tiny_llama, tmp_path, monkeypatch):
    import random as _random

    from rlhf.rollout import Generation
    from rlhf.world import flawed_response, good_response, parse_prompt, prompt_set

    def reply(content: str, copy: int) -> str:  # the "policy": a good and a flawed answer to each prompt
        return (good_response if copy == 0 else flawed_response)(parse_prompt(content), _random.Random(copy))

    def fake_generate(model, tok, prompts, cfg, seed=0, progress=None):
        return [Generation(text=reply(p[-1]["content"], n % 2), token_ids=[], ended=True) for n, p in enumerate(prompts)]

    monkeypatch.setattr("rlhf.stages.collect.generate", fake_generate)
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in prompt_set("train", 30, 0)])
    written_for: dict[str, set] = {}  # response -> the (prompt, copy) it was written as
    for line in prompts.read_text().splitlines():
        content = json.loads(line)["prompt"]
        for copy in range(2):
            written_for.setdefault(reply(content, copy), set()).add((content, copy))

    def collect(name, mismatch):
        out = tmp_path / name
        stats = run_collect(from_dict(CollectConfig, {"policy": str(tiny_llama), "prompts": str(prompts), "out": str(out),
                                                      "k": 2, "annotators": ["careful"], "mismatch_pairs": mismatch}))
        return stats, [json.loads(line) for line in out.read_text().splitlines()]

    plain_stats, plain = collect("plain.jsonl", 0)
    stats, rows = collect("mixed.jsonl", 2)
    assert plain_stats["mismatched_pairs_labelled"] == 0 and stats["mismatched_pairs_labelled"] > 40
    assert [r for r in rows if "-m" not in r["pair_id"]] == plain  # on-policy pairs and labels unchanged
    mismatched = [r for r in rows if "-m" in r["pair_id"]]
    good_vs_other = []
    for r in mismatched:
        prompt = r["prompt"][-1]["content"]
        sides = {side: {p for p, _ in written_for[r[side]]} for side in ("chosen", "rejected")}
        assert any(prompt in s for s in sides.values()) and any(s - {prompt} for s in sides.values())
        for ours, theirs in (("chosen", "rejected"), ("rejected", "chosen")):
            if (prompt, 0) in written_for[r[ours]] and prompt not in sides[theirs]:
                good_vs_other.append(ours == "chosen")
    assert len(good_vs_other) > 10
    assert sum(good_vs_other) / len(good_vs_other) > 0.9  # a good answer beats an answer to another question


def test_lora_reward_model_trains_adapters_and_head_only(tiny_llama, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", separable_rows(48))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(16, offset=5))
    out = tmp_path / "rm"
    summary = run_rm(rm_config(tiny_llama, train, val, out, lora={"enabled": True, "r": 4, "alpha": 8}))
    member = summary["members"][0]
    full = sum(p.numel() for p in load_reward_backbone(tiny_llama)[0].parameters())
    assert member["trainable_parameters"] < full / 4  # adapters and the scalar head, not the backbone
    assert member["val_accuracy"] > member["initial_val_accuracy"]
    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(out / "model.safetensors"))
    # Merged save: an ordinary folder; attention projections moved (merged adapters), the MLP did not.
    assert not any("lora" in k for k in after)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_drop_flagged_annotators_removes_the_random_rater(tiny_llama, tmp_path):
    """Three raters who agree and one who contradicts them at random: only the last one's labels go."""
    import random

    rng, rows = random.Random(0), []
    for i, r in enumerate(separable_rows(60)):
        flipped = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        for name in ("ann", "bob", "cat"):
            rows.append({**r, "annotator": name, "pair_id": i})
        rows.append({**(flipped if rng.random() < 0.5 else r), "annotator": "clicker", "pair_id": i})
    train = write_rows(tmp_path / "train.jsonl", rows)
    val = write_rows(tmp_path / "val.jsonl", separable_rows(8, offset=5))
    summary = run_rm(rm_config(tiny_llama, train, val, tmp_path / "rm", drop_flagged_annotators=True,
                               train={"max_steps": 2}))
    assert summary["dropped_annotators"] == ["clicker"]
    assert summary["pairs"] == 180
