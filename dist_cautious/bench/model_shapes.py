"""Parameter shapes of the models the memory estimator knows: presets and Hugging Face configs.

Only shapes matter to the estimator: how many elements each tensor has (states, grads, params)
and, for CAME, its last two dims (factored rows/columns) and, under FSDP, its first dim (the
rows that are sharded). Presets follow the published architectures:

- ``gpt2-124m``: GPT-2 small (vocab 50257, 1024 positions, 768 wide, 12 layers, tied head;
  HF ``Conv1D`` weights are stored ``(in, out)``), 124,439,808 params.
- ``llama-7b`` / ``llama-13b`` / ``llama-70b``: LLaMA-2 shapes (vocab 32000, untied head, SwiGLU
  MLP, RMSNorm without bias; 70B uses grouped-query attention with 8 KV heads):
  6,738,415,616 / 13,015,864,320 / 68,976,648,192 params.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelShapes:
    """A model as the ordered list of its trainable parameter shapes."""

    name: str
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def gpt2_shapes(name: str, vocab: int, positions: int, width: int, layers: int) -> ModelShapes:
    shapes: list[Shape] = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    shapes += [(width,), (width,)]  # final LayerNorm; the head is tied to the token embedding
    return ModelShapes(name, tuple(shapes))


def llama_shapes(name: str, vocab: int, width: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool = False) -> ModelShapes:
    if width % heads:
        raise ValueError(f"{name}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    kv_width = width // heads * kv_heads
    shapes: list[Shape] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, width), (kv_width, width), (kv_width, width), (width, width)]  # q, k, v, o
        shapes += [(intermediate, width), (intermediate, width), (width, intermediate)]  # gate, up, down
        shapes += [(width,), (width,)]  # input and post-attention RMSNorm
    shapes += [(width,)]
    if not tied:
        shapes += [(vocab, width)]
    return ModelShapes(name, tuple(shapes))


PRESETS: dict[str, ModelShapes] = {
    "gpt2-124m": gpt2_shapes("gpt2-124m", 50257, 1024, 768, 12),
    "llama-7b": llama_shapes("llama-7b", 32000, 4096, 11008, 32, 32, 32),
    "llama-13b": llama_shapes("llama-13b", 32000, 5120, 13824, 40, 40, 40),
    "llama-70b": llama_shapes("llama-70b", 32000, 8192, 28672, 80, 64, 8),
}


def _require(config: dict, key: str, source: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    return value


def from_hf_config(path: str | Path) -> ModelShapes:
    """Shapes from a Hugging Face ``config.json``: GPT-2 (``model_type: gpt2``) or any
    LLaMA-like decoder (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, optional ``num_key_value_heads`` and ``tie_word_embeddings``;
    biases, if the architecture has them, are not counted)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"model config {str(path)!r} does not exist") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model config {str(path)!r} is not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"model config {str(path)!r} must be a JSON object")
    source = path.name
    if config.get("model_type") == "gpt2":
        return gpt2_shapes(source, _require(config, "vocab_size", source), _require(config, "n_positions", source), _require(config, "n_embd", source), _require(config, "n_layer", source))
    heads = _require(config, "num_attention_heads", source)
    return llama_shapes(
        source,
        _require(config, "vocab_size", source),
        _require(config, "hidden_size", source),
        _require(config, "intermediate_size", source),
        _require(config, "num_hidden_layers", source),
        heads,
        config.get("num_key_value_heads") or heads,
        bool(config.get("tie_word_embeddings", False)),
    )


def resolve_model(spec: str) -> ModelShapes:
    """A preset name, or a path to a Hugging Face-style ``config.json``."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.endswith(".json") or Path(spec).exists():
        return from_hf_config(spec)
    raise ValueError(f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}) or a path to a config.json")


def from_module(name: str, module) -> ModelShapes:  # noqa: ANN001 (torch.nn.Module; kept torch-free at import)
    """Trainable param shapes of a live (unwrapped) module, in registration order."""
    return ModelShapes(name, tuple(tuple(p.shape) for p in module.parameters() if p.requires_grad))
