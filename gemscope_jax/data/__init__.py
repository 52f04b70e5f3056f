"""Text, tokens and activation streams."""

from gemscope_jax.data.text import (available, corpus_files, python_doc_files,
                                    read_text, shakespeare_files)

__all__ = ["available", "corpus_files", "python_doc_files", "read_text",
           "shakespeare_files"]
