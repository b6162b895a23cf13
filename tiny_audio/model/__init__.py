"""The ASR model: frozen audio encoder -> trainable projector -> frozen causal LM decoder."""
