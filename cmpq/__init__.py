"""cmpq: Channel-wise Mixed-Precision Quantization for Hugging Face causal LMs."""

__version__ = "0.1.0"

from cmpq.config import CMPQConfig  # noqa: E402
from cmpq.integrations.transformers import register as _register_with_transformers  # noqa: E402
from cmpq.model.loading import load_model  # noqa: E402
from cmpq.nn.linear import CMPQLinear  # noqa: E402
from cmpq.options import RunOptions  # noqa: E402
from cmpq.quantize import quantize  # noqa: E402
from cmpq.storage.io import load, save  # noqa: E402

# AutoModelForCausalLM.from_pretrained(cmpq folder) works once cmpq is imported (docs/format.md)
_register_with_transformers()

__all__ = ["CMPQConfig", "RunOptions", "CMPQLinear", "quantize", "save", "load", "load_model", "__version__"]
