"""The character-level tokenizer of the toy models, as a standard Hugging Face tokenizer.

One token per character of the task's alphabet, plus special tokens. Encoding adds nothing
(no BOS, no EOS): a prompt of n characters is n ids, everywhere (transformers, vLLM). The
training target of a response is its characters followed by EOS. The vocabulary is padded
with unused added tokens up to `VOCAB_SIZE`, so the tokenizer's `len()` equals the model's
`vocab_size` and no engine ever sees an id without a token.

This module knows the alphabet and the special tokens; it knows nothing of models.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from asyncopd.tasks.toy.task import ALPHABET

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)
# Fixed ids (the specials come first), so every toy checkpoint agrees on them.
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
# Model and tokenizer vocabulary size: 4 specials + 23 characters, padded to a multiple of 8.
VOCAB_SIZE = 32


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: ids 0..3 special, then the alphabet, then unused `<extra_i>` tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    n_extra = VOCAB_SIZE - len(vocab)
    if n_extra < 0:
        raise ValueError(f"alphabet needs {len(vocab)} ids but VOCAB_SIZE is {VOCAB_SIZE}")
    for i in range(n_extra):
        vocab[f"<extra_{i}>"] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own pre-token (spaces included), so WordLevel maps it to one id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens with nothing in between (WordLevel's default would insert spaces).
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(vocab)[: len(SPECIAL_TOKENS)] + [t for t in vocab if t.startswith("<extra_")])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    if ids != (PAD_ID, EOS_ID, BOS_ID, UNK_ID) or len(tokenizer) != VOCAB_SIZE:
        raise AssertionError(f"toy tokenizer built with special ids {ids} and size {len(tokenizer)}")
    return tokenizer
