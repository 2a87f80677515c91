"""Values shared by several layers, stated once. Imports nothing, so any module can read it."""

# Label value that carries no loss: PyTorch's `cross_entropy` ignore_index default, which the
# reference recipe, transformers' collators and the Trainer's padding of predictions all use.
IGNORE_INDEX = -100
