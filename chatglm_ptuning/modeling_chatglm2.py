"""ChatGLM2-6B / ChatGLM3-6B. (placeholder: being written)"""
from .configuration import ChatGLM2Config
from .modeling_base import ChatGLMLMBase


class ChatGLM2ForConditionalGeneration(ChatGLMLMBase):
    config_class = ChatGLM2Config
