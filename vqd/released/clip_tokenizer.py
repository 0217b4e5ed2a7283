"""The CLIP BPE tokenizer as transformers' `CLIPTokenizer` folder, and the check that a folder's ids are vqd's.

vqd tokenizes captions with open_clip's copy of CLIP's BPE (vqd.text.tokenize: <start_of_text> ... <end_of_text>,
then id 0 to 77). A diffusers VQ-Diffusion pipeline carries a transformers tokenizer folder instead. The
released ITHQ folder pads with the token "!" (id 0), as the released code padded with 0, so both give the
same ids; `check_tokenizer_folder` verifies that on probe captions rather than trusting it. The export
writes vocab.json / merges.txt from open_clip's vocabulary file (nothing is downloaded), with the same "!"
padding. One difference is transformers' own: a pad token is a special token, so a run like "!!" in a
prompt becomes two pad ids there where CLIP's BPE has one merged token.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from vqd.errors import UserError
from vqd.released.tensors import ReleasedFormatError

PAD_TOKEN = "!"  # id 0: what vqd.text.tokenize pads with
PROBES = ("a teddy bear playing in the pool", "A red double-decker bus, on a city street.", "", "café 42 x")


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-character table, in id order (the first 256 tokens of its vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    order = list(printable)
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            order.append(b)
            extra += 1
    return [chars[b] for b in order]


def write_clip_tokenizer(folder: Path, context_length: int = 77) -> Path:
    """vocab.json, merges.txt and the configs of transformers' CLIPTokenizer, from open_clip's BPE file."""
    from vqd.io import installed_package_folder
    from vqd.text import VOCAB_SIZE

    package = installed_package_folder("open_clip")
    if package is None:
        raise ImportError("writing the CLIP tokenizer needs open_clip: pip install open_clip_torch")
    lines = gzip.open(package / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    # CLIP's vocabulary: 256 bytes, the same 256 ending a word, the first 48,894 merges, <start/end_of_text>
    merges = lines[1:VOCAB_SIZE - 2 * 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"open_clip's BPE file gives {len(vocab)} tokens, CLIP has {VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": PAD_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    config = {**special, "model_max_length": context_length, "do_lower_case": True, "errors": "replace",
              "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def check_tokenizer_folder(folder: Path, context_length: int) -> None:
    """Raise unless the transformers tokenizer in `folder` gives vqd.text.tokenize's ids on the probe captions."""
    import torch
    from transformers import CLIPTokenizer

    from vqd.text import tokenize

    if not folder.is_dir():
        raise ReleasedFormatError(f"{folder}: missing (the pipeline's text tokenizer)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError or TypeError for a broken folder
        raise ReleasedFormatError(f"{folder}: not a CLIP tokenizer transformers can read ({type(e).__name__}: {e})") from e
    if tokenizer.model_max_length != context_length:
        raise ReleasedFormatError(f"{folder}: model_max_length {tokenizer.model_max_length}, the text encoder reads "
                                  f"{context_length} ids")
    theirs = tokenizer(list(PROBES), padding="max_length", max_length=context_length, truncation=True,
                       return_tensors="pt").input_ids
    ours = tokenize(list(PROBES), context_length)
    if not torch.equal(theirs.long(), ours):
        pad = tokenizer.pad_token_id
        hint = (f" (it pads with id {pad} {tokenizer.pad_token!r}; vqd pads with 0, as the released model was trained: "
                f"set pad_token to {PAD_TOKEN!r} in its special_tokens_map.json and tokenizer_config.json)"
                if pad != 0 else "")
        raise ReleasedFormatError(f"{folder}: the tokenizer's ids differ from CLIP's BPE as vqd tokenizes{hint}")
