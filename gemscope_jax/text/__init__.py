"""Text and tokens, without JAX: the Gemma 3 tokenizer rebuilt offline,
the embedded corpora and text specs, BOS-led token windows, special tokens,
the Gemma 3 chat format and windows of JSONL conversations.
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "Tokenizer": "gemscope_jax.text.tokenizer",
    "default_tokenizer": "gemscope_jax.text.tokenizer",
    "CORPORA": "gemscope_jax.text.corpora",
    "available": "gemscope_jax.text.corpora",
    "corpus_files": "gemscope_jax.text.corpora",
    "english_files": "gemscope_jax.text.corpora",
    "english_heldout_files": "gemscope_jax.text.corpora",
    "python_doc_files": "gemscope_jax.text.corpora",
    "read_text": "gemscope_jax.text.corpora",
    "shakespeare_files": "gemscope_jax.text.corpora",
    "text_files": "gemscope_jax.text.corpora",
    "ConversationWindowSource": "gemscope_jax.text.conversations",
    "encode_chat": "gemscope_jax.text.chat",
    "windows_from_conversations": "gemscope_jax.text.conversations",
    "Windows": "gemscope_jax.text.windows",
    "ordinary_mask": "gemscope_jax.text.windows",
    "special_mask": "gemscope_jax.text.windows",
    "windows_from_files": "gemscope_jax.text.windows",
    "windows_from_ids": "gemscope_jax.text.windows",
}, submodules=("chat", "conversations", "corpora", "tokenizer",
              "windows"))
