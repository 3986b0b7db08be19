"""Hugging Face ``config.json`` -> :class:`~pipo.io.spec.ModelSpec`.

One reader per family table entry: llama, mistral and qwen2 share the llama layout (RMSNorm, rope,
gated SiLU MLP, grouped-query attention) and differ only in biases and defaults; OPT has learned
positions, LayerNorm and a ReLU MLP. Anything we cannot run exactly (other rope scalings, post-norm
OPT, projected OPT embeddings, sliding-window qwen2) is refused here with a
:class:`~pipo.errors.ModelFormatError`, before a single weight is read.

Both spellings transformers has written are accepted: ``rope_theta`` + ``rope_scaling`` (v4) and
``rope_parameters`` (v5, which also carries ``rope_theta``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipo.errors import ModelFormatError
from pipo.io.spec import SUPPORTED_FAMILIES, ModelSpec, RopeScaling

_LLAMA_LIKE = ("llama", "mistral", "qwen2")
# What transformers assumes when a config omits tie_word_embeddings.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "opt": True}
_ACTIVATION = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "opt": "relu"}


def spec_from_hf_config(config: dict[str, Any], name: str = "") -> ModelSpec:
    """Build the spec of a model from its parsed HF ``config.json``.

    Raises :class:`ModelFormatError` for a ``model_type`` outside
    :data:`~pipo.io.spec.SUPPORTED_FAMILIES` or for a variant of a family pipo cannot run exactly.
    """
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ModelFormatError(
            f"model_type {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    _check_activation(config, family)
    fields = _opt_fields(config) if family == "opt" else _llama_fields(config, family)
    return ModelSpec(
        family=family,
        vocab_size=_required(config, "vocab_size"),
        tie_embeddings=bool(config.get("tie_word_embeddings", _TIE_DEFAULT[family])),
        name=name or str(config.get("_name_or_path") or ""),
        **fields,
        **_token_ids(config),
    )


def load_spec(path: str | Path) -> ModelSpec:
    """Read ``config.json`` from a model directory (or the file itself) and return its spec.

    EOS ids listed in a ``generation_config.json`` beside it are added to ``eos_ids``: instruct
    models (Llama-3) stop on end-of-turn tokens that only the generation config names.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    spec = spec_from_hf_config(_read_json(file), name=path.name if path.is_dir() else path.parent.name)
    generation_file = file.parent / "generation_config.json"
    if generation_file.is_file():
        extra = _token_ids(_read_json(generation_file))["eos_ids"]
        spec = replace(spec, eos_ids=tuple(dict.fromkeys(spec.eos_ids + extra)))
    return spec


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``, or ModelFormatError naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"no such file or directory: {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{file} is not a readable JSON config: {err}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{file} does not hold a JSON object.")
    return data


def _required(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, or a ModelFormatError naming the missing key."""
    value = config.get(key)
    if value is None:
        raise ModelFormatError(f"config.json of a {config.get('model_type')} model lacks {key!r}.")
    return value


def _check_activation(config: dict[str, Any], family: str) -> None:
    """Refuse an MLP activation other than the one the family table implements."""
    act = config.get("activation_function" if family == "opt" else "hidden_act", _ACTIVATION[family])
    if act != _ACTIVATION[family]:
        raise ModelFormatError(
            f"{family} models with activation {act!r} are not supported (expected {_ACTIVATION[family]!r})."
        )


def _llama_fields(config: dict[str, Any], family: str) -> dict[str, Any]:
    """Size, norm, rope and bias fields of a llama / mistral / qwen2 config."""
    hidden = _required(config, "hidden_size")
    n_heads = _required(config, "num_attention_heads")
    if family == "qwen2" and config.get("use_sliding_window"):
        raise ModelFormatError("qwen2 models with use_sliding_window=true are not supported.")
    theta, scaling = _rope(config)
    qkv_bias = family == "qwen2" or bool(config.get("attention_bias", False))
    return {
        "hidden": hidden,
        "n_layers": _required(config, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "head_dim": config.get("head_dim") or hidden // n_heads,
        "ffn": _required(config, "intermediate_size"),
        "max_positions": _required(config, "max_position_embeddings"),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": qkv_bias,
        "mlp_bias": family == "llama" and bool(config.get("mlp_bias", False)),
        "sliding_window": config.get("sliding_window") if family == "mistral" else None,
    }


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from either the v4 or the v5 spelling of the rope settings."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelFormatError(
            f"rope scaling type {rope_type!r} is not supported; only 'llama3' (Llama-3.1) scaling is."
        )
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_positions=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise ModelFormatError(f"llama3 rope scaling in config.json lacks {err.args[0]!r}.") from None


def _opt_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Size, norm and bias fields of an OPT config (pre-norm OPT only)."""
    if not config.get("do_layer_norm_before", True):
        raise ModelFormatError("OPT-350m-style post-norm models are not supported.")
    hidden = _required(config, "hidden_size")
    if config.get("word_embed_proj_dim", hidden) != hidden:
        raise ModelFormatError("OPT models with word_embed_proj_dim != hidden_size are not supported.")
    if config.get("_remove_final_layer_norm") or not config.get("layer_norm_elementwise_affine", True):
        raise ModelFormatError("OPT models without a final affine layer norm are not supported.")
    n_heads = _required(config, "num_attention_heads")
    bias = bool(config.get("enable_bias", True))
    return {
        "hidden": hidden,
        "n_layers": _required(config, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": hidden // n_heads,
        "ffn": _required(config, "ffn_dim"),
        "max_positions": _required(config, "max_position_embeddings"),
        "norm_eps": 1e-5,  # torch.nn.LayerNorm's default, which OPT uses
        "attention_bias": bias,
        "mlp_bias": bias,
    }


def _token_ids(config: dict[str, Any]) -> dict[str, Any]:
    """bos / eos / pad ids; ``eos_token_id`` may be an int or a list."""
    eos = config.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    bos, pad = config.get("bos_token_id"), config.get("pad_token_id")
    return {
        "bos_id": None if bos is None else int(bos),
        "eos_ids": eos_ids,
        "pad_id": None if pad is None else int(pad),
    }
