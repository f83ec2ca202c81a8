"""Offline GPT-2 models the project builds itself (no machine that builds or tests llmq can reach a hub).

Three kinds, all saved with ``save_pretrained`` so that every loader stays a real ``from_pretrained(path)``:

- :func:`install_pretrained_gpt2`: 4 layers, 256 wide, a 4K-token byte-level BPE, pretrained on English the
  project ships (worker/pretraining.py wrote the committed weights in worker/data/pretrained_gpt2/). It has
  learned some English, so a fine-tune visibly teaches it: the model of the demo and of the tests that
  need a model that learns.
- :func:`build_tiny_gpt2`: 2 layers, 128 wide, a ~2K-token byte-level BPE, random weights. Builds, saves and
  reloads in well under a second; the model for tests that need speed only.
- :func:`build_full_size_gpt2`: the GPT-2 124M architecture (``GPT2Config()`` defaults, vocab 50257) with
  random weights. It costs exactly what the real model costs, so it is the model for speed figures.

Both tokenizers are trained on ``worker/data/corpus.txt`` (see ``scripts/make_sample_data.py``), which
contains the Alpaca prompt headers, so a header costs tens of tokens rather than one per few characters.

Builds are deterministic for a given seed and idempotent: a directory that already holds a complete build
with the same arguments (recorded in ``llmq_build.json``, written last) is returned untouched. A build is
written to a temporary sibling directory first and then moved into place, so concurrent builders and
interrupted builds never leave a directory that looks complete but is not.

CLI: ``python -m worker.model_factory OUT_DIR [--tiny | --pretrained | --full-size] [--seed N]`` prints the
directory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing transformers costs seconds; only the build functions need it
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BUILD_MARKER",
    "EOS_TOKEN",
    "build_full_size_gpt2",
    "build_tiny_gpt2",
    "corpus_paths",
    "install_pretrained_gpt2",
    "is_built",
    "main",
    "train_tokenizer",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
EOS_TOKEN = "<|endoftext|>"
BUILD_MARKER = "llmq_build.json"
# Bump when the build procedure changes in a way that should invalidate existing builds.
FACTORY_VERSION = 1
PRETRAINED_DIR = DATA_DIR / "pretrained_gpt2"  # committed weights, written by worker/pretraining.py
FULL_SIZE_TOKENIZER_VOCAB = 8192  # an upper bound: the shipped corpus supports fewer merges than this

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def corpus_paths() -> list[Path]:
    """The text files the project ships for tokenizer training."""
    return [DATA_DIR / "corpus.txt"]


def _corpus_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _documents(paths: list[Path]) -> Iterator[str]:
    # Whole documents (the corpus separates them with blank lines), not lines: the Alpaca header's "\n\n"
    # must be visible to the trainer for it to learn merges across it.
    for path in paths:
        yield from path.read_text(encoding="utf-8").split("\n\n\n")


def train_tokenizer(
    corpus_paths: list[Path], vocab_size: int, *, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``corpus_paths``.

    Same pipeline as GPT-2's own tokenizer: the ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), the
    ByteLevel decoder and post-processor, and one special token ``<|endoftext|>`` (id 0) that is BOS, EOS,
    UNK and PAD. ``vocab_size`` is an upper bound: training stops early when the corpus has no pair left to
    merge. Returns a ``GPT2Tokenizer`` (transformers 5's single, tokenizers-backed GPT-2 tokenizer class,
    a subclass of ``PreTrainedTokenizerFast``) that ``AutoTokenizer.from_pretrained`` reloads after
    ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Tokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must cover the 256 byte symbols and {EOS_TOKEN}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_documents(list(corpus_paths)), trainer=trainer)
    tokenizer = GPT2Tokenizer(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )
    return tokenizer


def _marker(kind: str, params: dict[str, Any], tokenizer_vocab_size: int) -> dict[str, Any]:
    paths = corpus_paths()
    return {
        "factory_version": FACTORY_VERSION,
        "kind": kind,
        "params": params,
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "corpus_sha256": _corpus_sha256(paths),
    }


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_built(out_dir: Path, expected: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete build whose marker equals ``expected``."""
    if not all((out_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    return _read_marker(out_dir) == expected


def _build(
    out_dir: Path,
    *,
    kind: str,
    params: dict[str, Any],
    tokenizer_vocab_size: int,
    config_kwargs: dict[str, Any],
    model_vocab_size: int | None,
    seed: int,
) -> Path:
    """Build into a temporary sibling of ``out_dir`` and move it into place; skip if already built."""
    out_dir = Path(out_dir)
    expected = _marker(kind, params, tokenizer_vocab_size)
    if is_built(out_dir, expected):
        return out_dir

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_positions = int(config_kwargs.get("n_positions", 1024))
    tokenizer = train_tokenizer(corpus_paths(), tokenizer_vocab_size, model_max_length=n_positions)
    eos_id = tokenizer.eos_token_id
    assert isinstance(eos_id, int)
    vocab_size = len(tokenizer) if model_vocab_size is None else model_vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}")
    config = GPT2Config(
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **config_kwargs
    )
    # Seeded without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.eval()
    generation_config = model.generation_config
    generation_config.bos_token_id = eos_id
    generation_config.eos_token_id = eos_id
    generation_config.pad_token_id = eos_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        with _no_progress_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker_text = json.dumps(expected, indent=2, sort_keys=True) + "\n"
        (tmp / BUILD_MARKER).write_text(marker_text, encoding="utf-8")
        # mkdtemp makes the directory 0700 and safetensors writes 0600; the directory is shared by the
        # gateway and workers (possibly other users, on a compose volume), so make it world-readable.
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)
        _move_into_place(tmp, out_dir, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # transformers 5 shows a "Writing model shards" tqdm bar on stderr in every save_pretrained.
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _move_into_place(tmp: Path, out_dir: Path, expected: dict[str, Any]) -> None:
    try:
        # Atomic when out_dir is absent or an empty directory.
        os.rename(tmp, out_dir)
        return
    except OSError:
        pass
    if is_built(out_dir, expected):  # a concurrent builder finished first
        return
    # out_dir holds something else (an older build, other files): drop its marker first so it never looks
    # complete while half replaced, move every file over, and write the marker last.
    (out_dir / BUILD_MARKER).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == BUILD_MARKER):
        os.replace(item, out_dir / item.name)


def build_tiny_gpt2(
    out_dir: Path,
    *,
    vocab_size: int = 2048,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 2,
    n_positions: int = 512,
    seed: int = 0,
) -> Path:
    """A small GPT-2 (random weights) and its tokenizer in ``out_dir``; returns ``out_dir``.

    The model's vocabulary is exactly the tokenizer's (``vocab_size`` bounds the BPE; the shipped corpus
    supports a little over 2K tokens). BOS, EOS and PAD are ``<|endoftext|>`` in the config and the
    generation config.
    """
    params = {
        "vocab_size": vocab_size,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_positions": n_positions,
        "seed": seed,
    }
    return _build(
        out_dir,
        kind="tiny",
        params=params,
        tokenizer_vocab_size=vocab_size,
        config_kwargs={"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions},
        model_vocab_size=None,
        seed=seed,
    )


def install_pretrained_gpt2(out_dir: Path) -> Path:
    """The small pretrained GPT-2 that ships with llmq, copied into ``out_dir``; returns ``out_dir``.

    A copy rather than the package's own folder, so that a model id names a directory the caller owns
    (``ft:<its name>:...``) and nothing ever writes into the installed package. Idempotent like the builds:
    an up-to-date copy (same weights, by sha256) is left untouched.
    """
    out_dir = Path(out_dir)
    weights = hashlib.sha256((PRETRAINED_DIR / "model.safetensors").read_bytes()).hexdigest()
    expected = {"factory_version": FACTORY_VERSION, "kind": "pretrained", "params": {"weights_sha256": weights}}
    if is_built(out_dir, expected):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        for item in PRETRAINED_DIR.iterdir():
            if item.is_file():
                shutil.copyfile(item, tmp / item.name)
        (tmp / BUILD_MARKER).write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)
        _move_into_place(tmp, out_dir, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_full_size_gpt2(out_dir: Path, seed: int = 0) -> Path:
    """The GPT-2 124M architecture with random weights and a corpus-trained tokenizer in ``out_dir``.

    The model keeps GPT-2's vocabulary size (50257) so every forward costs what the real model's does;
    the tokenizer's ids (a few thousand) are all below it. Saves about 500 MB (fp32 safetensors).
    """
    from transformers import GPT2Config

    defaults = GPT2Config()
    return _build(
        out_dir,
        kind="full-size",
        params={"seed": seed},
        tokenizer_vocab_size=FULL_SIZE_TOKENIZER_VOCAB,
        config_kwargs={"n_positions": defaults.n_positions},
        model_vocab_size=defaults.vocab_size,
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.model_factory", description="Build an offline GPT-2 model directory."
    )
    parser.add_argument("out_dir", type=Path, help="directory to build into (reused if already built)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--tiny", action="store_const", const="tiny", dest="kind", help="2 layers x 128 wide (default)")
    kind.add_argument(
        "--pretrained",
        action="store_const",
        const="pretrained",
        dest="kind",
        help="4 layers x 256 wide, pretrained on shipped English (committed weights)",
    )
    kind.add_argument(
        "--full-size", action="store_const", const="full-size", dest="kind", help="GPT-2 124M architecture"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "full-size":
        path = build_full_size_gpt2(args.out_dir, seed=args.seed)
    elif args.kind == "pretrained":
        path = install_pretrained_gpt2(args.out_dir)
    else:
        path = build_tiny_gpt2(args.out_dir, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
