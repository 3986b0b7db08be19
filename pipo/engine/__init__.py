"""The engine: options, placed weights, KV cache, executors and the generation loop."""

from pipo.engine.engine import Engine, Generation
from pipo.engine.options import EngineOptions

__all__ = ["Engine", "EngineOptions", "Generation"]
