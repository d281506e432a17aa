"""Independent arithmetic of what each rank must hold (float32): its slices plus what it replicates."""
from __future__ import annotations


def _cut(n: int, tp: int, r: int) -> tuple[int, int]:
    base, extra = divmod(n, tp)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _rows(n: int, tp: int, r: int) -> int:
    a, b = _cut(n, tp, r)
    return b - a


def llama_rank_bytes(c: dict, tp: int, r: int) -> int:
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // nh
    q0, q1 = _cut(nh, tp, r)
    g = nh // nkv
    kv = (q1 - 1) // g + 1 - q0 // g  # every KV head this rank's queries read, copies included
    qh = q1 - q0
    ab, mb = c.get("attention_bias", False), c.get("mlp_bias", False)
    ob = ab  # Llama: attention_bias covers o_proj too
    if c["model_type"] == "qwen2":
        ab, ob = True, False  # q/k/v biases only, whatever the config says
    elif c["model_type"] == "mistral":
        ab = ob = False
    ir = _rows(i, tp, r)
    per_layer = 2 * h  # two RMSNorms, replicated
    per_layer += (qh + 2 * kv) * d * h + (qh + 2 * kv) * d * ab
    per_layer += h * qh * d + (h if (ob and r == 0) else 0)  # o_proj; its bias on rank 0 only
    per_layer += 2 * ir * h + 2 * ir * mb + h * ir + (h if (mb and r == 0) else 0)
    n = L * per_layer + h + _rows(v, tp, r) * h
    if not c.get("tie_word_embeddings", False):
        n += _rows(v, tp, r) * h
    return 4 * n


def gpt2_rank_bytes(c: dict, tp: int, r: int) -> int:
    e, nh, L, v, p = c["n_embd"], c["n_head"], c["n_layer"], c["vocab_size"], c["n_positions"]
    i = c.get("n_inner") or 4 * e
    d = e // nh
    qh = _rows(nh, tp, r)
    ir = _rows(i, tp, r)
    per_layer = 4 * e  # ln_1, ln_2 weight + bias, replicated
    per_layer += 3 * qh * d * (e + 1)  # c_attn weight + bias, this rank's heads
    per_layer += e * qh * d + (e if r == 0 else 0)
    per_layer += ir * (e + 1) + e * ir + (e if r == 0 else 0)
    return 4 * (L * per_layer + 2 * e + _rows(v, tp, r) * e + p * e)


def llama_projection_shapes(c: dict, tp: int, r: int) -> list[tuple[int, int]]:
    """(output rows, input columns) of each projection this rank holds, per layer."""
    h, i, nh, nkv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // nh
    q0, q1 = _cut(nh, tp, r)
    g = nh // nkv
    kv = (q1 - 1) // g + 1 - q0 // g
    ir = _rows(i, tp, r)
    return [((q1 - q0 + 2 * kv) * d, h), (h, (q1 - q0) * d), (2 * ir, h), (h, ir)]


def llama_rank_bytes_quantized(c: dict, tp: int, r: int, method: str, group: int = 32, packed: bool = False) -> int:
    """llama_rank_bytes with the projections quantized: int8 codes (1 byte) + a float32 scale per
    output row; int4 codes (1 byte) + float32 (scale, zero) per group as stored. Once loaded
    (`packed`), also the kernel's copies: int8's scales in bf16; int4's instead of its plain codes
    and scales (PyTorch's packed codes, half a byte, with bf16 (scale, zero); tpserve::int4_gemv's,
    half a byte, with float16 (s, z - 8 s): the same bytes as stored); and the LM head quantized to
    int8 at load."""
    n = llama_rank_bytes(c, tp, r)
    for rows, cols in llama_projection_shapes(c, tp, r):
        n -= c["num_hidden_layers"] * 4 * rows * cols
        if method == "int8":
            q = rows * cols + 4 * rows
            if packed:
                q += 2 * rows
        else:
            q = rows * cols + rows * (cols // group) * 2 * 4
            if packed:
                q = 2 * (rows * cols // 2 + rows * (cols // group) * 2 * 2)
        n += c["num_hidden_layers"] * q
    if packed:  # the head, quantized to int8 at load from this rank's float vocab rows
        v, h = _rows(c["vocab_size"], tp, r), c["hidden_size"]
        n += v * h + 4 * v + 2 * v
        if not c.get("tie_word_embeddings", False):
            n -= 4 * v * h  # the float rows served only the head
    return n

