"""The tiny vision-language models of the tests: the package's own (:mod:`prepack.tiny_vision`), which the docs use too."""

from prepack.tiny_vision import (  # noqa: F401
    FAMILIES, LLAVA_IMAGE, LLAVA_PIXELS, QWEN_IMAGE, QWEN_TOKENS, TEXT, VOCAB, alone, chats, gemma3_model, image,
    llava_model, llava_processor, model_and_processor, qwen_model, qwen_processor,
)
