"""Chat prompt templates per family; chat() and stream_chat(). (Filled in by the tokenizer/chat work.)"""


class ChatMixin:
    """chat() / stream_chat() for ChatGLM LM classes."""
