"""Model files and model loading.

- `files`: where a model's files are (directory or hub name) and what can be read without torch
  (a fast tokenizer, the vocabulary size); the cache service uses only this.
- `loading`: loading Hugging Face causal LMs and tokenizers with transformers.
This package knows nothing of tasks or services.
"""
