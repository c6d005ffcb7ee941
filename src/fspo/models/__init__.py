"""The embedded default model (tokenizer + small Llama) and model loading for every stage."""
