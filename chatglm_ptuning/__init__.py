"""chatglm-ptuning: P-tuning v2 and sibling soft-prompt methods for the ChatGLM family.

Importing the package registers the ChatGLM config, tokenizer and model classes with the
transformers Auto classes, so official checkpoint folders load offline without remote code
(their `auto_map` is never followed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration import ChatGLM2Config, ChatGLM6BConfig, ChatGLMConfig
from .loading import MODEL_CLASSES, load_model
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from .tokenization import ChatGLMTokenizer

AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
for _config_class, _model_class in MODEL_CLASSES.items():
    # The official auto_map sends AutoModel to the LM class too (users call model.chat()).
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)
for _config_class in (ChatGLMConfig, ChatGLM6BConfig, ChatGLM2Config):
    AutoTokenizer.register(_config_class, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)

__all__ = [
    "ChatGLMConfig",
    "ChatGLM6BConfig",
    "ChatGLM2Config",
    "ChatGLMForConditionalGeneration",
    "ChatGLM2ForConditionalGeneration",
    "ChatGLMTokenizer",
    "load_model",
]
