"""ChatGLM-6B. (placeholder: being written)"""
from .configuration import ChatGLM6BConfig
from .modeling_base import ChatGLMLMBase


class ChatGLMForConditionalGeneration(ChatGLMLMBase):
    config_class = ChatGLM6BConfig
