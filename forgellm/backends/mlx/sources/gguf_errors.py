"""What a GGUF file this converter cannot serve raises (its reader and its tokenizer alike)."""


class UnsupportedGguf(ValueError):
    """The file is not a GGUF model this converter can serve; the message says what is supported."""
