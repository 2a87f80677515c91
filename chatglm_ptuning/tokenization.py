"""ChatGLM tokenizers. (placeholder: being written)"""
from transformers import PreTrainedTokenizer


class ChatGLMTokenizer(PreTrainedTokenizer):
    pass
