"""Tokenizers for language modelling: byte-level (built in) and BPE from local files.

A tokenizer is named by a *spec* string, the value of ``task.tokenizer`` and of
``ssdbench prepare-data --tokenizer``:

- ``byte``: UTF-8 bytes 0..255 plus an end-of-text token 256 (vocabulary 257). No files, no
  dependencies; the default.
- ``gpt2`` / ``gpt-neox-20b``: the GPT-2 (50,257 tokens) and GPT-NeoX-20B (50,277 tokens, the
  Pile's tokenizer in the Mamba papers) byte-level BPEs. Nothing here downloads them: they are
  looked up in ``$SSDBENCH_TOKENIZERS/<name>/`` and in the Hugging Face hub cache
  (``$HF_HOME/hub``, filled by an earlier ``huggingface-cli download``). Needs the optional
  ``tokenizers`` package (``pip install 'ssdbench[lm]'``).
- a path: a ``tokenizer.json`` file, or a folder with ``tokenizer.json`` or with GPT-2-style
  ``vocab.json`` + ``merges.txt``.

Worked example::

    >>> tok = load_tokenizer("byte")
    >>> tok.vocab_size, tok.eot_id
    (257, 256)
    >>> tok.encode("hé").tolist()          # 'é' is two UTF-8 bytes
    [104, 195, 169]
    >>> tok.token_bytes()[[104, 195, 256]].tolist()   # bytes each token stands for
    [1, 1, 1]

Every document is stored as ``encode(text) + [eot_id]``; the end-of-text token counts as one
byte in bits-per-byte (it stands for the document separator), so with ``byte`` bits per byte is
exactly loss / ln 2.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

# Names of the BPEs we know how to find offline, with the Hugging Face hub repositories whose
# cached snapshots hold their tokenizer.json.
KNOWN_BPE = {
    "gpt2": ["openai-community/gpt2", "gpt2"],
    "gpt-neox-20b": ["EleutherAI/gpt-neox-20b"],
}
ALIASES = {"neox": "gpt-neox-20b", "gpt-neox": "gpt-neox-20b", "gpt-2": "gpt2"}
EOT_STRINGS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


class TokenizerNotFound(FileNotFoundError):
    """A named tokenizer is not available offline; the message says what path to pass."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each token stands for (end-of-text: 1)."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def describe(self) -> dict:
        return {"spec": "byte", "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "sha256": None}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPEs."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class HFTokenizer:
    """A BPE from the Hugging Face ``tokenizers`` library (tokenizer.json or vocab + merges)."""

    def __init__(self, tok, name: str, source: list[Path]):
        self.tok, self.name, self.source = tok, name, source
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        eot = next((tok.token_to_id(s) for s in EOT_STRINGS if tok.token_to_id(s) is not None), None)
        if eot is None:
            raise ValueError(f"tokenizer {name} has no end-of-text token (looked for {', '.join(EOT_STRINGS)})")
        self.eot_id = int(eot)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs on the library's own thread pool; worker processes each get one.
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64 bytes per token: exact for byte-level BPEs (each character of a
        token string is one byte), UTF-8 length of the decoded token otherwise; special tokens 1."""
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        out = np.ones(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or token in special:
                continue
            if all(c in inv for c in token):
                out[i] = max(1, len(token))
            else:  # not a byte-level vocabulary (e.g. SentencePiece): the decoded length
                out[i] = max(1, len(self.tok.decode([i]).encode("utf-8")))
        return out

    def describe(self) -> dict:
        h = hashlib.sha256()
        for p in self.source:
            h.update(p.read_bytes())
        return {"spec": self.name, "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "files": [str(p) for p in self.source], "sha256": h.hexdigest()}


def _hub_dirs() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots.append(hf_home / "hub")
    return roots


def _find_named(name: str) -> list[Path]:
    """Folders that may hold the named tokenizer's files, in search order."""
    out = []
    if os.environ.get("SSDBENCH_TOKENIZERS"):
        out.append(Path(os.environ["SSDBENCH_TOKENIZERS"]) / name)
    for root in _hub_dirs():
        for repo in KNOWN_BPE[name]:
            snaps = root / f"models--{repo.replace('/', '--')}" / "snapshots"
            if snaps.is_dir():
                out += sorted(snaps.iterdir(), reverse=True)
    return out


def _from_folder(folder: Path, name: str):
    """HFTokenizer from a folder's tokenizer.json or vocab.json + merges.txt; None if neither."""
    if (folder / "tokenizer.json").is_file():
        return _from_files([folder / "tokenizer.json"], name)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _from_files([folder / "vocab.json", folder / "merges.txt"], name)
    return None


def _from_files(files: list[Path], name: str) -> HFTokenizer:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        raise ImportError(f"tokenizer {name!r} needs the 'tokenizers' package: pip install 'ssdbench[lm]' "
                          f"(or pip install tokenizers)") from e
    if files[0].name.endswith(".json") and len(files) == 1:
        tok = Tokenizer.from_file(str(files[0]))
    else:
        # GPT-2 style vocab.json + merges.txt: a byte-level BPE. The end-of-text token is part of
        # GPT-2's vocab.json; make it special so "<|endoftext|>" in text maps to one id.
        tok = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = json.loads(files[0].read_text(encoding="utf-8"))
        specials = [s for s in EOT_STRINGS if s in vocab]
        if specials:
            tok.add_special_tokens(specials)
    return HFTokenizer(tok, name, files)


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str = "byte"):
    """The tokenizer named by ``spec`` (see the module docstring); TokenizerNotFound if it
    cannot be found offline, with the path to pass instead."""
    spec = str(spec).strip()
    key = ALIASES.get(spec.lower(), spec.lower())
    if key == "byte":
        return ByteTokenizer()
    if key in KNOWN_BPE:
        tried = _find_named(key)
        for folder in tried:
            tok = _from_folder(folder, key)
            if tok is not None:
                return tok
        where = ", ".join(str(p) for p in tried) or "no $SSDBENCH_TOKENIZERS, no Hugging Face hub cache"
        raise TokenizerNotFound(
            f"tokenizer {spec!r} is not available offline (searched: {where}). Pass the path of its "
            f"tokenizer.json, or of a folder with tokenizer.json or vocab.json + merges.txt, e.g. "
            f"tokenizer=/data/{key}/tokenizer.json (from the Hugging Face repository "
            f"{KNOWN_BPE[key][0]}), or put those files in $SSDBENCH_TOKENIZERS/{key}/")
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_files([path], str(path))
    if path.is_dir():
        tok = _from_folder(path, str(path))
        if tok is not None:
            return tok
        raise TokenizerNotFound(f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt")
    raise TokenizerNotFound(
        f"unknown tokenizer {spec!r}: use 'byte', 'gpt2', 'gpt-neox-20b', or the path of a tokenizer.json "
        f"or of a folder with tokenizer.json or vocab.json + merges.txt")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for token ids < vocab_size: uint16 up to 65,536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_vocab(spec: str) -> int | None:
    """Vocabulary size of a tokenizer spec; the config resolver ``${ssdbench.tokenizer_vocab:...}``.

    None when the tokenizer cannot be loaded: the task's constructor then reports the problem as
    one config error (task.tokenizer: ...), which an exception inside a resolver cannot do.
    """
    try:
        return load_tokenizer(str(spec)).vocab_size
    except (TokenizerNotFound, ImportError, ValueError):
        return None


def register_resolver() -> None:
    """Make ``${ssdbench.tokenizer_vocab:<spec>}`` available to configs (conf/task/pile.yaml uses it
    so that model.vocab_size = ${task.vocab_size} follows the tokenizer)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ssdbench.tokenizer_vocab"):
        OmegaConf.register_new_resolver("ssdbench.tokenizer_vocab", tokenizer_vocab)


register_resolver()
