"""The math of a Llama/Qwen2-family decoder in float32 numpy, one function per piece.

Shared by the numpy backend (numpy_graphs.py) and the tests' sophon.sail stand-in, so that both
compute exactly the same model. The batch dimension of the graph contract is dropped here:
hidden [L, H], positions [L], q [L, heads, dim], k/v [T, kv_heads, dim], masks [L, T] (additive).
Everything stays float32: numpy 2 promotes float32 with any numpy float64 scalar to float64, so
constants are made float32 (or kept as Python floats, which do not promote) before use.
"""

from __future__ import annotations

import numpy as np

from worker.core.checkpoint import LayerWeights, ModelArchitecture, Weights


def embed(weights: Weights, token_ids: np.ndarray) -> np.ndarray:
    """token_ids [L] -> hidden [L, H]."""
    return weights.embed[token_ids]


def project_qkv(
    layer: LayerWeights, arch: ModelArchitecture, hidden: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized hidden -> q [L, heads, dim], k and v [L, kv_heads, dim], RoPE applied to q and k."""
    fused = rms_norm(hidden, layer.attn_norm, arch.rms_eps) @ layer.qkv
    if layer.qkv_bias is not None:
        fused += layer.qkv_bias
    length, dim = hidden.shape[0], arch.head_dim
    q_end = arch.num_heads * dim
    k_end = q_end + arch.num_kv_heads * dim
    q = fused[:, :q_end].reshape(length, arch.num_heads, dim)
    k = fused[:, q_end:k_end].reshape(length, arch.num_kv_heads, dim)
    v = fused[:, k_end:].reshape(length, arch.num_kv_heads, dim)
    cos, sin = rope_tables(arch, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def finish_layer(
    layer: LayerWeights, arch: ModelArchitecture, hidden: np.ndarray, attention: np.ndarray
) -> np.ndarray:
    """Attention output [L, heads * dim] -> output projection, residual, then the MLP and its residual."""
    after_attention = hidden + attention @ layer.o
    if layer.o_bias is not None:
        after_attention += layer.o_bias
    return after_attention + mlp(layer, rms_norm(after_attention, layer.mlp_norm, arch.rms_eps))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    inverse_rms = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    return x * inverse_rms * weight


def rope_tables(arch: ModelArchitecture, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [L, 1, dim / 2] for the half-split (Hugging Face) rotation.

    Angles are computed in float64 and rounded once, as they are tiny tables next to the matmuls.
    """
    half = arch.head_dim // 2
    inverse_frequencies = arch.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(positions, dtype=np.float64)[:, None, None] * inverse_frequencies
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (i, i + dim/2) of x [L, heads, dim] by the position angles."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    rotated = np.empty_like(x)
    rotated[..., :half] = first * cos - second * sin
    rotated[..., half:] = second * cos + first * sin
    return rotated


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grouped-query attention: q [L, heads, dim] over keys/values [T, kv_heads, dim] with an
    additive mask [L, T] -> [L, heads * dim]."""
    length, heads, dim = q.shape
    kv_heads = keys.shape[1]
    scale = np.float32(1.0 / np.sqrt(dim))
    grouped = (q * scale).reshape(length, kv_heads, heads // kv_heads, dim).transpose(1, 2, 0, 3)
    scores = grouped @ keys.transpose(1, 2, 0)[:, None]  # [kv_heads, group, L, T]
    scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ values.transpose(1, 0, 2)[:, None]  # [kv_heads, group, L, dim]
    return out.transpose(2, 0, 1, 3).reshape(length, heads * dim)


def mlp(layer: LayerWeights, x: np.ndarray) -> np.ndarray:
    gate, up = np.split(x @ layer.gate_up, 2, axis=-1)
    # SiLU as gate * sigmoid(gate), with sigmoid through tanh: no overflow for large |gate|.
    return (gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up) @ layer.down


def head_logits(weights: Weights, hidden_row: np.ndarray) -> np.ndarray:
    """One position's hidden [H] -> logits [V] (final norm, then the lm_head)."""
    return rms_norm(hidden_row, weights.final_norm, weights.arch.rms_eps) @ weights.lm_head
