"""treadle: a minimal transformer runtime for fast LLM decoding.

import treadle
llm = treadle.load()                      # the embedded default model (SmolLM2-135M-Instruct)
print(llm.generate("Hello", treadle.SamplingParams(max_new_tokens=32), chat=True).text)
"""

from importlib import import_module

__version__ = "0.1.0"

# Public name -> defining module. Resolved on first use, so `import treadle.graph` stays light.
_EXPORTS = {
    "LLM": ".runtime.llm",
    "Completion": ".runtime.llm",
    "load": ".runtime.llm",
    "SamplingParams": ".runtime.sampling",
    "ModelConfig": ".graph.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'treadle' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
