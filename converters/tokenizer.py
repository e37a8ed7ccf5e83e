"""Tokenizers for the text encoder: loading the user's (Wan ships google/umt5-xxl's) and building a tiny one.

Nothing is downloaded: `load_tokenizer` reads a local directory; `build_tiny_tokenizer` trains a small
T5-style (unigram, "▁" word marker, EOS appended) tokenizer from a built-in corpus for tests and the
tiny pipeline.
"""

from __future__ import annotations

import os

from omnijax.io.atomic import atomic_path

# Pad = 0 and EOS = 1, as in T5/umT5 vocabularies.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

_CORPUS = """
a person walks a dog along the beach at sunset while waves roll in
the camera pans slowly across a quiet street with parked cars and trees
a red car drives through a tunnel and its reflection shines on the wet road
two children play football on green grass in a park, shadows on the ground
an empty room with white walls, a wooden floor and a window with soft light
a cat jumps onto the table and knocks over a glass of water
clean background, no people, static shot, natural lighting, high quality video
the river flows under the old stone bridge in the morning fog
ein Mann fährt Fahrrad durch die Stadt; une femme lit un livre dans le jardin
smoke rises from the chimney and the shadow of the bird crosses the wall
"""


def load_tokenizer(directory: str):
    """transformers.AutoTokenizer from a local directory (e.g. Wan's `google/umt5-xxl` folder)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 256) -> str:
    """Trains a tiny T5-style tokenizer and saves it (tokenizer.json + config) to `out_dir`, atomically.

    Returns out_dir. The vocabulary fits the tiny umT5 variant (vocab_size <= 1024).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>",
                                      shrinking_factor=0.75)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)
    with atomic_path(out_dir, directory=True) as tmp:
        fast.save_pretrained(tmp)
    return out_dir
