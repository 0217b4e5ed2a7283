"""The denoiser network: shapes, input checks, attention/AdaLN maths, checkpointing, bf16."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqd.transformer import AdaLayerNorm, Denoiser, GridConv, SelfAttention, TokenGridTransformer, TransformerConfig

K, GRID, T, D_TEXT = 12, (3, 4), 10, 16


def micro_config(**overrides) -> TransformerConfig:
    fields = dict(num_codes=K, grid=GRID, depth=2, width=32, heads=4, text_dim=D_TEXT, num_timesteps=T)
    fields.update(overrides)
    return TransformerConfig(**fields)


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    x_t = torch.randint(0, K + 1, (batch, n), generator=g)  # includes [MASK] = K
    t = torch.randint(0, T, (batch,), generator=g)
    text = torch.randn(batch, 7, D_TEXT, generator=g)
    return x_t, t, text


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Denoiser(micro_config()).eval()


def test_output_is_float_logits_over_k_codes_with_classes_on_dim_1(net):
    x_t, t, text = inputs()
    out = net(x_t, t, text)
    assert out.shape == (3, K, GRID[0] * GRID[1]) and out.dtype == torch.float32
    assert net.token_embedding.num_embeddings == K + 1  # codes + [MASK] in, codes only out
    assert torch.isfinite(out).all()


def test_all_mask_input_is_accepted(net):
    x_t = torch.full((2, GRID[0] * GRID[1]), K)
    assert net(x_t, torch.tensor([0, T - 1]), torch.randn(2, 5, D_TEXT)).shape == (2, K, 12)


@pytest.mark.parametrize(
    "change, argument",
    [
        (lambda x, t, c: (x.float(), t, c), "x_t"),
        (lambda x, t, c: (x[:, :-1], t, c), "x_t"),
        (lambda x, t, c: (x.clone().fill_(K + 1), t, c), "x_t"),
        (lambda x, t, c: (x.clone().fill_(-1), t, c), "x_t"),
        (lambda x, t, c: (x, t[:2], c), "t"),
        (lambda x, t, c: (x, t.float(), c), "t"),
        (lambda x, t, c: (x, t.clone().fill_(T), c), "t"),
        (lambda x, t, c: (x, t, c[..., :-1]), "text"),
        (lambda x, t, c: (x, t, c[:2]), "text"),
        (lambda x, t, c: (x, t, c.long()), "text"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(net, change, argument):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        net(*change(*inputs()))


def test_attention_is_full_and_depends_on_text_and_t(net):
    x_t, t, text = inputs()
    base = net(x_t, t, text)
    later = x_t.clone()
    later[:, -1] = (later[:, -1] + 1) % K
    # The denoiser is bidirectional: the last token changes the first position's logits.
    assert not torch.allclose(net(later, t, text)[:, :, 0], base[:, :, 0])
    assert not torch.allclose(net(x_t, t, text + 1.0), base)
    assert not torch.allclose(net(x_t, (t + 1) % T, text), base)


def test_position_embedding_is_row_plus_column(net):
    pos = net.position_embedding()
    h, w = GRID
    for i, j in [(0, 0), (1, 2), (h - 1, w - 1)]:
        expected = net.row_embedding.weight[i] + net.col_embedding.weight[j]
        assert torch.equal(pos[i * w + j], expected)


def test_ada_layer_norm_matches_hand_computation():
    torch.manual_seed(1)
    norm = AdaLayerNorm(8, num_timesteps=5)
    x, t = torch.randn(2, 3, 8), torch.tensor([1, 4])
    emb = norm.t_embedding.weight[t]
    mod = F.silu(emb) @ norm.modulation.weight.T + norm.modulation.bias
    scale, shift = mod[:, :8], mod[:, 8:]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(norm(x, t), expected)


def test_ada_layer_norm_adds_a_condition_to_the_timestep_embedding():
    torch.manual_seed(2)
    norm = AdaLayerNorm(8, num_timesteps=5)
    x, t, condition = torch.randn(2, 3, 8), torch.tensor([0, 3]), torch.randn(2, 8)
    mod = F.silu(norm.t_embedding.weight[t] + condition) @ norm.modulation.weight.T + norm.modulation.bias
    expected = F.layer_norm(x, (8,)) * (1 + mod[:, None, :8]) + mod[:, None, 8:]
    torch.testing.assert_close(norm(x, t, condition), expected)


def test_pooled_condition_reaches_every_norm_through_the_first_row_only():
    torch.manual_seed(0)
    pooled = Denoiser(micro_config(pooled_condition=True)).eval()
    plain = Denoiser(micro_config()).eval()
    plain.load_state_dict({k: v for k, v in pooled.state_dict().items() if not k.startswith("pool_projection")})
    for net in (pooled, plain):  # cross-attention silenced: only the pooled path can carry the text
        for block in net.blocks:
            torch.nn.init.zeros_(block.cross_attn.proj.weight)
    x_t, t, text = inputs()
    other_first_row = text.clone()
    other_first_row[:, 0] += 1.0
    other_rest = text.clone()
    other_rest[:, 1:] += 1.0
    assert not torch.allclose(pooled(x_t, t, other_first_row), pooled(x_t, t, text))
    torch.testing.assert_close(pooled(x_t, t, other_rest), pooled(x_t, t, text))
    torch.testing.assert_close(plain(x_t, t, other_first_row), plain(x_t, t, text))
    # By hand: each AdaLN's embedding is t's plus the projection of row 0.
    block = pooled.blocks[0]
    x = torch.randn(3, 12, 32)
    condition = pooled.pool_projection(text[:, 0])
    torch.testing.assert_close(block.norm1(x, t, condition), AdaLayerNorm.forward(block.norm1, x, t, condition))
    emb = block.norm1.t_embedding(t) + text[:, 0] @ pooled.pool_projection.weight.T + pooled.pool_projection.bias
    mod = block.norm1.modulation(F.silu(emb))
    torch.testing.assert_close(block.norm1(x, t, condition),
                               F.layer_norm(x, (32,)) * (1 + mod[:, None, :32]) + mod[:, None, 32:])


def test_pooled_condition_needs_timestep_norms():
    with pytest.raises(ValueError, match="pooled_condition"):
        TokenGridTransformer(micro_config(pooled_condition=True, num_timesteps=0, causal=True))


def test_grid_conv_adds_each_cells_3x3_neighbourhood_in_raster_order():
    """GridConv against a sum written out cell by cell, on a grid that is not square (h = 3, w = 4)."""
    torch.manual_seed(4)
    (h, w), channels = GRID, 5
    mixing = GridConv(channels, GRID)
    x = torch.randn(2, h * w, channels)
    weight, bias = mixing.conv.weight[:, 0], mixing.conv.bias  # [C, 3, 3], [C]
    expected = x.clone()
    for i in range(h):
        for j in range(w):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:  # zero padding at the border
                        expected[:, i * w + j] += weight[:, di + 1, dj + 1] * x[:, (i + di) * w + j + dj]
            expected[:, i * w + j] += bias
    torch.testing.assert_close(mixing(x), expected)


def test_local_mixing_sits_in_every_mlp_and_leaves_the_plain_layout_alone():
    torch.manual_seed(5)
    mixed, plain = Denoiser(micro_config(local_mixing=True)), Denoiser(micro_config())
    assert all(isinstance(block.mlp[1], GridConv) for block in mixed.blocks)
    # without it the MLP keeps the released code's keys (mlp.0 / mlp.2), so older exports still load
    assert {k for k in plain.state_dict() if ".mlp." in k} == {
        f"blocks.{i}.mlp.{j}.{p}" for i in range(2) for j in (0, 2) for p in ("weight", "bias")}
    assert mixed(*inputs()).shape == plain(*inputs()).shape
    with pytest.raises(ValueError, match="local_mixing"):
        TokenGridTransformer(micro_config(local_mixing=True, num_timesteps=0, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_explicit_softmax(causal):
    torch.manual_seed(2)
    attn = SelfAttention(width=8, heads=2, causal=causal, dropout=0.0, max_len=5)
    x = torch.randn(2, 5, 8)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(8, dim=-1)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4)
        if causal:
            scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        outs.append(scores.softmax(-1) @ v[..., sl])
    expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("pooled,local", [(False, False), (True, True)])
def test_checkpointing_gives_same_outputs_and_grads(pooled, local):
    torch.manual_seed(3)
    plain = Denoiser(micro_config(pooled_condition=pooled, local_mixing=local)).train()
    ckpt = Denoiser(micro_config(checkpoint=True, pooled_condition=pooled, local_mixing=local)).train()
    ckpt.load_state_dict(plain.state_dict())
    x_t, t, text = inputs()
    outs, grads = [], []
    for net in (plain, ckpt):
        out = net(x_t, t, text)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_bf16_autocast_forward_and_backward(net):
    x_t, t, text = inputs()
    reference = net(x_t, t, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x_t, t, text)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
    net.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x_t, t, text).logsumexp(1).mean().backward()
        assert net.head.weight.grad is not None and torch.isfinite(net.head.weight.grad).all()
    finally:
        net.zero_grad(set_to_none=True)
        net.eval()


def test_config_checks():
    with pytest.raises(ValueError, match="width"):
        Denoiser(micro_config(width=30))
    with pytest.raises(ValueError, match="cfg"):
        Denoiser(micro_config(causal=True))
