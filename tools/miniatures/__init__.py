"""The scripts that build the miniature models and speech shipped in `tiny_audio/assets/` (tiny, mini).

    python -m tools.miniatures.build tiny    # ~15 s
    python -m tools.miniatures.build mini    # ~40 min on 2 cores; needs espeak-ng

Seeded: a rebuild gives the same sentences, tokenizer and audio, and (on the same machine and software) the
same trained weights. docs/miniatures.md says what each model is and how it was trained.
"""
