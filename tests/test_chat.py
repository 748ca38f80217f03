"""Chat formatting: label masking, the truncation policy, padding, and user models without a template."""

import pytest

from rlhf.algos.core import IGNORE_INDEX
from rlhf.data.chat import TooLong, encode_sft, pack_right, pad_left, pad_right, render_prompt, split_prompt_response
from rlhf.models.loading import load_causal_lm

PROMPT = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_causal_lm(tiny_llama)[1]


def test_prompt_tokens_are_masked_and_response_tokens_are_not(tok):
    enc = encode_sft(tok, PROMPT, "3 + 4 = 7.", max_length=256)
    p, r = split_prompt_response(tok, PROMPT, "3 + 4 = 7.")
    assert enc.input_ids == p + r
    assert enc.labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert enc.labels[len(p):] == r and IGNORE_INDEX not in r
    assert r[-1] == tok.eos_token_id  # the model learns to stop
    assert tok.decode(r, skip_special_tokens=True) == "3 + 4 = 7."
    # The prompt ends with the assistant marker: exactly what generation is given.
    assert tok.decode(p).endswith("<|assistant|>")
    assert tok.decode(p) == render_prompt(tok, PROMPT)


def test_truncation_policies(tok):
    long_prompt = [{"role": "user", "content": "What is 3 + 4? " * 20}]
    p, r = split_prompt_response(tok, long_prompt, "7.")
    limit = len(r) + 5
    left = encode_sft(tok, long_prompt, "7.", limit, "left")
    assert len(left.input_ids) == limit and left.input_ids[-len(r):] == r  # response kept whole
    assert left.input_ids[:5] == p[-5:]  # the newest prompt tokens survive
    right = encode_sft(tok, long_prompt, "7.", len(p) + 1, "right")
    assert right.input_ids == p + r[:1]  # cut at the end: the EOS is lost
    assert encode_sft(tok, long_prompt, "7.", len(p), "right") is None  # no response left: dropped
    assert encode_sft(tok, PROMPT, "seven " * 50, 20, "left") is None  # the response alone does not fit
    with pytest.raises(TooLong, match="longer than data.max_length"):
        encode_sft(tok, long_prompt, "7.", limit, "error")


def test_padding_sides():
    from rlhf.data.chat import Encoded

    batch = pad_right([Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([5], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist()[1] == [IGNORE_INDEX] * 3
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_packing_puts_samples_side_by_side_with_restarting_positions():
    from rlhf.data.chat import Encoded

    a, b, c, d = (Encoded(list(range(10, 10 + n)), [IGNORE_INDEX] + list(range(11, 10 + n))) for n in (5, 2, 3, 1))
    batch = pack_right([b, a, c], pad_id=0)  # longest first, each into the first row with room: [a], [c, b]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [10, 11, 12, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, 12, 13, 14], [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 11]]
    assert batch["token_mask"].tolist() == [[1] * 5, [1] * 5]
    assert "attention_mask" not in batch
    e = Encoded([7, 8], [7, 8])  # a sample whose first token is scored: never by the previous sample's last one
    tail = pack_right([a, e, d], pad_id=0)
    assert tail["input_ids"].tolist() == [[10, 11, 12, 13, 14], [7, 8, 10, 10, 10]]  # the tail repeats, never pad
    assert tail["labels"].tolist()[1] == [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert tail["position_ids"].tolist()[1] == [0, 1, 0, 0, 1] and tail["token_mask"].tolist()[1] == [1, 1, 1, 0, 0]


def test_model_without_template_or_pad_gets_both(tiny_gpt2):
    model, tok = load_causal_lm(tiny_gpt2)
    assert tok.chat_template and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    enc = encode_sft(tok, PROMPT, "7.", 256)
    assert enc.input_ids[-1] == tok.eos_token_id  # its own EOS closes the turn
