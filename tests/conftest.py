# Triton kernels run on CPU tensors only under the interpreter, which must be on before any kernel is defined.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
