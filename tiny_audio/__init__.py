"""tiny-audio: train a speech-recognition projector between a frozen audio encoder and a frozen LLM."""

__version__ = "0.1.0"
