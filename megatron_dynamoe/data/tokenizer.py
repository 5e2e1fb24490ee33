"""A Hugging Face tokenizer behind Megatron-Core's tokenizer interface (`HFTokenizerAdapter`),
what preprocessing and GPTDataset use."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from megatron_dynamoe.data.errors import DataError

__all__ = ["HFTokenizerAdapter"]

# Module named in `unique_identifiers` (part of the index-cache hash): where the adapter lived
# when those hashes were first made (data/datasets.py), kept so existing index caches still hit.
_IDENTIFIER_MODULE = "megatron_dynamoe.data.datasets"


def _tokenizer_base():
    from megatron.core.tokenizers import MegatronTokenizerBase

    return MegatronTokenizerBase


class HFTokenizerAdapter(_tokenizer_base()):
    """A Hugging Face tokenizer behind Megatron-Core's tokenizer interface.

    What GPTDataset uses: `eod` (end-of-document id: the tokenizer's EOS unless `eod_token`
    names another token), `vocab_size` (len(tokenizer), added tokens included; also picks the
    .bin dtype), `pad` (-1: pretraining data is never padded, and SmolLM2's pad token equals its
    EOS), and `unique_identifiers`, which enter the index-cache hash: they hold only `name`, the
    vocabulary size and the EOD id, so the same tokenizer named the same way hits the cache.
    `tokenize` does not add special tokens (preprocessing appends the EOD itself).
    """

    def __init__(self, tokenizer, name: str, eod_token: Optional[str] = None):
        super().__init__(str(name), {})
        self.hf_tokenizer = tokenizer
        self.name = str(name)
        if eod_token is None:
            eod = tokenizer.eos_token_id
            if eod is None:
                raise DataError(f"tokenizer {name!r} has no EOS token: name the end-of-document "
                                f"token explicitly (eod_token / --eod-token)")
        else:
            eod = tokenizer.convert_tokens_to_ids(eod_token)
            if eod is None or (eod == tokenizer.unk_token_id and eod_token != tokenizer.unk_token):
                raise DataError(f"end-of-document token {eod_token!r} is not in the vocabulary "
                                f"of tokenizer {name!r}")
        self._eod = int(eod)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return -1

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.hf_tokenizer.get_vocab()

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{_IDENTIFIER_MODULE}.{type(self).__qualname__}"),
                            ("tokenizer_path", self.name), ("vocab_size", self.vocab_size),
                            ("eod", self.eod)])

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, no special tokens (fast tokenizers batch in Rust)."""
        return self.hf_tokenizer(list(texts), add_special_tokens=False,
                                 verbose=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(list(ids))

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return self.hf_tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                     **kwargs)

    def __repr__(self) -> str:
        return f"HFTokenizerAdapter({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"
