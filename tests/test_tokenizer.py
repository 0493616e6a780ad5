"""Both tokenizer backends, built on the fly."""

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vcppo_jax.models import ModelConfig
from vcppo_jax.tokenizer import (
    TokenizerError,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)

CORPUS = [
    f"Q: {a} + {b} = ? A: {a} + {b} = {a + b}. Answer: {a + b}"
    for a in range(40)
    for b in range(0, 40, 3)
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return train_sentencepiece(CORPUS, prefix, vocab_size=64, user_defined_symbols=["Answer:"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(d / "tokenizer.json"))
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return str(d)


def test_sentencepiece_round_trip_and_ids(spm_path):
    tok = load_tokenizer(spm_path, prompt_template="Q: {prompt} A:")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "Q: 12 + 30 = ? A: 12 + 30 = 42. Answer: 42"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True, add_eos=True) == [1] + ids + [2]
    # Digits are single tokens.
    assert len(tok.encode("123")) == len(tok.encode("1")) + 2


def test_hf_round_trip_and_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)  # Directory: finds tokenizer.json and its config.
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "Q: 7 + 9 = ? A: 7 + 9 = 16. Answer: 16"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(os.path.join(hf_dir, "tokenizer.json"), eos_token="<nope>")


@pytest.mark.parametrize("which", ["spm", "hf"])
def test_encode_prompts_right_pads_with_template(which, spm_path, hf_dir):
    path = spm_path if which == "spm" else hf_dir
    tok = load_tokenizer(path, prompt_template="Q: {prompt} A:")
    prompts, lengths = tok.encode_prompts(["1 + 2 = ?", "10 + 20 + 30 = ?"])
    assert prompts.dtype == np.int32 and prompts.shape == (2, lengths.max())
    for i, p in enumerate(["1 + 2 = ?", "10 + 20 + 30 = ?"]):
        want = tok.encode(f"Q: {p} A:", add_bos=True)
        assert prompts[i, : lengths[i]].tolist() == want
        assert (prompts[i, lengths[i] :] == tok.pad_id).all()
    with pytest.raises(TokenizerError, match="more than max_length=3"):
        tok.encode_prompts(["1 + 2 = ?"], max_length=3)


def test_vocab_check_and_errors(spm_path, tmp_path):
    tok = load_tokenizer(spm_path)
    small = ModelConfig(
        vocab_size=tok.vocab_size - 1,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
    )
    with pytest.raises(TokenizerError, match="smaller than the tokenizer's vocabulary"):
        check_vocab(tok, small)
    check_vocab(tok, small.replace(vocab_size=tok.vocab_size))
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="must contain"):
        load_tokenizer(spm_path, prompt_template="no placeholder")


def test_a_workdirs_tokenizer_serves_only_the_task_it_was_trained_for(tmp_path):
    """A workdir's tokenizer is trained on its task's corpus: with the task changed (labels
    on, whose letters it has never seen) it is refused, not reused with every letter <unk>."""
    from vcppo_jax.data.sources import SyntheticSource
    from vcppo_jax.data.synthetic import AdditionTask
    from vcppo_jax.tokenizer import TokenizerError

    wd = str(tmp_path)
    first = SyntheticSource(AdditionTask(5, 1), wd, 0, 48).tokenizer
    again = SyntheticSource(AdditionTask(5, 1), wd, 0, 48).tokenizer  # Reused as it is.
    assert again.encode("Add: 3 5 =") == first.encode("Add: 3 5 =")
    with pytest.raises(TokenizerError, match="trained for other task settings.*labels"):
        SyntheticSource(AdditionTask(5, 1, labels=True), wd, 0, 48)
    with pytest.raises(TokenizerError, match="seed: 0 there, 1 here"):
        SyntheticSource(AdditionTask(5, 1), wd, 1, 48)
    os.remove(os.path.join(wd, "tokenizer", "settings.json"))  # A workdir from before.
    SyntheticSource(AdditionTask(5, 1), wd, 1, 48)
