"""vqd.vqvae / vqd.taming: quantizer maths, remapping, folders, and taming checkpoint compatibility."""

import pytest
import torch

from vqd.taming import TAMING_CONFIGS, infer_taming_config, load_taming_checkpoint
from vqd.vqvae import VQVAE, VectorQuantizer, VQVAEConfig, count_code_usage, load_tokenizer

TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, num_embeddings=16)


def images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---- quantizer ----

def test_nearest_code_is_brute_force_argmin():
    torch.manual_seed(0)
    q = VectorQuantizer(37, 5, ema=False)
    z, w = torch.randn(200, 5), q.embedding.weight.detach()
    brute = torch.tensor([min(range(37), key=lambda k: float(((z[i] - w[k]) ** 2).sum())) for i in range(200)])
    assert torch.equal(q.nearest(z), brute)
    subset = torch.tensor([3, 10, 20, 36])
    brute_sub = torch.tensor([min(range(4), key=lambda j: float(((z[i] - w[subset[j]]) ** 2).sum()))
                              for i in range(200)])
    assert torch.equal(q.nearest(z, subset), brute_sub)


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(8, 3, ema=True, restart_after=0).eval()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, ids, _, _ = q(z)
    assert torch.allclose(z_q, q.embedding.weight[ids].permute(0, 3, 1, 2))  # value: the chosen codes
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.allclose(z.grad, g)  # gradient: passed straight to the encoder output


def test_commitment_loss_is_beta_times_mse_to_stopped_codes():
    q = VectorQuantizer(8, 3, beta=0.3, ema=True, restart_after=0).eval()
    z = torch.randn(2, 3, 2, 2)
    z_q, _, loss, _ = q(z)
    assert torch.allclose(loss, 0.3 * ((z - z_q) ** 2).mean())


def test_ema_update_matches_hand_computation():
    q = VectorQuantizer(2, 1, ema=True, decay=0.5, eps=0.0, restart_after=0).train()
    q.initialized.fill_(1)  # skip the data-dependent init: codes are set by hand
    q.embedding.weight.data = torch.tensor([[0.0], [10.0]])
    q.embed_avg.copy_(q.embedding.weight.data)
    # inputs 1, 2 -> code 0; 9 -> code 1
    q(torch.tensor([1.0, 2.0, 9.0]).reshape(1, 1, 1, 3))
    # N = 0.5*1 + 0.5*[2, 1] = [1.5, 1.0];  m = 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5];  e = m / N
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.embed_avg, torch.tensor([[1.5], [9.5]]))
    assert torch.allclose(q.embedding.weight, torch.tensor([[1.0], [9.5]]))


def test_ema_laplace_smoothing():
    q = VectorQuantizer(2, 1, ema=True, decay=0.5, eps=0.1, restart_after=0).train()
    q.initialized.fill_(1)
    q.embedding.weight.data = torch.tensor([[0.0], [10.0]])
    q.embed_avg.copy_(q.embedding.weight.data)
    q(torch.tensor([1.0, 2.0, 9.0]).reshape(1, 1, 1, 3))
    n = 2.5
    smoothed = (torch.tensor([1.5, 1.0]) + 0.1) / (n + 2 * 0.1) * n
    assert torch.allclose(q.embedding.weight.squeeze(1), torch.tensor([1.5, 9.5]) / smoothed)


def test_dead_code_restart_reseeds_unused_codes_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema=True, decay=0.9, restart_after=3).train()
    q.initialized.fill_(1)
    q.embedding.weight.data = torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    q.embed_avg.copy_(q.embedding.weight.data)
    z = torch.randn(1, 2, 4, 4) * 0.1  # every vector is nearest to code 0: codes 1..3 are dead
    for step in range(2):
        q(z)
        assert torch.equal(q.unused_steps, torch.tensor([0, step + 1, step + 1, step + 1]))
    q(z)  # third unused step: restart
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (1, 2, 3):
        assert (q.embedding.weight[k] - flat).abs().sum(1).min() < 1e-6  # equals one of the encoder outputs
    assert torch.equal(q.unused_steps, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(q.embed_avg[1:], q.embedding.weight[1:]) and torch.all(q.cluster_size[1:] == 1)


def test_data_dependent_init_uses_encoder_outputs():
    q = VectorQuantizer(3, 2, ema=True, restart_after=0).train()
    z = torch.randn(1, 2, 5, 5) + 100.0
    q(z)
    assert int(q.initialized) == 1 and q.embedding.weight.min() > 90


# ---- model, remapping, folders ----

def test_encode_decode_shapes_and_contract():
    m = VQVAE(VQVAEConfig(**TINY)).eval()
    x = images()
    ids = m.encode(x)
    assert ids.dtype == torch.long and ids.shape == (4, 64) and m.grid == (8, 8) and m.image_size == 16
    assert int(ids.max()) < m.num_codes == 16
    out = m.decode(ids)
    assert out.shape == (4, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert isinstance(m.config, dict) and m.config["num_embeddings"] == 16


def test_remap_round_trip_and_nearest_used_code():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**TINY)).eval()
    x = images(8)
    raw = m.encode(x)
    decoded_raw = m.decode(raw)
    used = raw.unique()
    m.set_code_remap(used)
    assert m.num_codes == used.numel() and m.config["used_codes"] == used.numel()
    remapped = m.encode(x)
    assert int(remapped.max()) < m.num_codes
    assert torch.equal(m.code_map[remapped], raw)  # same codes, new numbering
    assert torch.allclose(m.decode(remapped), decoded_raw)  # decode maps back
    # a smaller kept set: every vector goes to the nearest KEPT code
    keep = used[: max(1, used.numel() // 2)]
    m.set_code_remap(keep)
    h = m.quant_conv(m.encoder(x)).permute(0, 2, 3, 1).reshape(-1, TINY["embed_dim"])
    d2 = torch.cdist(h, m.quantize.embedding.weight[keep])
    assert torch.equal(m.encode(x).flatten(), d2.argmin(1))


def test_remap_uint16_limit():
    m = VQVAE(VQVAEConfig(**{**TINY, "num_embeddings": 70_000, "embed_dim": 2}))
    with pytest.raises(ValueError, match="uint16"):
        m.set_code_remap(torch.arange(65_536))
    m.set_code_remap(torch.arange(65_535))  # the largest allowed K'
    assert m.num_codes == 65_535
    with pytest.raises(ValueError, match="num_embeddings"):
        m.set_code_remap(torch.tensor([70_000]))


def test_save_load_round_trip_with_remap(tmp_path):
    m = VQVAE(VQVAEConfig(**TINY))
    m.train()
    m(images(8))  # moves the EMA state away from its init
    m.eval()
    m.set_code_remap(count_code_usage(m, [images(8)]).nonzero().squeeze(1))
    m.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.training and loaded.num_codes == m.num_codes
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images(3, seed=5)
    assert torch.equal(loaded.encode(x), m.encode(x))


def test_count_code_usage_matches_bincount():
    m = VQVAE(VQVAEConfig(**TINY)).eval()
    batches = [images(4, seed=s) for s in range(3)]
    counts = count_code_usage(m, batches)
    expected = torch.bincount(torch.cat([m.encode(b).flatten() for b in batches]), minlength=16)
    assert torch.equal(counts, expected) and int(counts.sum()) == 3 * 4 * 64


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"image_size 30 .* downsampling factor 4"):
        VQVAEConfig(image_size=30, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="codebook"):
        VQVAEConfig(codebook="kmeans")
    with pytest.raises(ValueError, match="image_sise: unknown key for VQVAEConfig"):
        VQVAEConfig.from_dict({"image_sise": 32})
    m = VQVAE(VQVAEConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="num_codes"):
        m.decode(torch.full((1, 64), 16))
    with pytest.raises(ValueError, match="divisible"):
        m.encode(torch.zeros(1, 3, 15, 15))


def test_training_step_reduces_reconstruction_loss():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**TINY)).train()
    # without warm-up, 2e-3 collapses this tiny model's codebook to ~3 codes in 5 steps (4 channels a group;
    # one a group, instance norm, survived it): the trainer warms up, this loop does not, so it steps gently
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=5e-4)
    x = images(8).sign() * 0.8  # a fixed, learnable batch
    losses = []
    for _ in range(30):
        rec, q_loss, _, _ = m(x)
        loss = (x - rec).abs().mean() + q_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---- taming-transformers compatibility ----

def taming_reference_shapes(ch, ch_mult, nrb, attn_res, resolution, z, embed_dim, n_embed, gumbel):
    """Key -> shape of taming's VQModel / GumbelVQ state dict, derived from its module construction rules."""
    s = {}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resblock(f"{prefix}.mid.block_2", c, c)

    n = len(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    res, in_mult = resolution, (1,) + tuple(ch_mult)
    for i in range(n):
        cin, cout = ch * in_mult[i], ch * ch_mult[i]
        for b in range(nrb):
            resblock(f"encoder.down.{i}.block.{b}", cin, cout)
            cin = cout
            if res in attn_res:
                attn(f"encoder.down.{i}.attn.{b}", cout)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout, 3)
            res //= 2
    c = ch * ch_mult[-1]
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, z, 3)
    conv("decoder.conv_in", z, c, 3)
    mid("decoder", c)
    res = resolution // 2 ** (n - 1)
    for i in reversed(range(n)):
        cout = ch * ch_mult[i]
        for b in range(nrb + 1):
            resblock(f"decoder.up.{i}.block.{b}", c, cout)
            c = cout
            if res in attn_res:
                attn(f"decoder.up.{i}.attn.{b}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
            res *= 2
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    conv("quant_conv", z, embed_dim, 1), conv("post_quant_conv", embed_dim, z, 1)
    if gumbel:
        conv("quantize.proj", z, n_embed, 1)
        s["quantize.embed.weight"] = (n_embed, embed_dim)
    else:
        s["quantize.embedding.weight"] = (n_embed, embed_dim)
    return s


@pytest.mark.parametrize("name,gumbel", [("f8_8192_gumbel", True), ("f16_16384", False)])
def test_paper_taming_configs_have_taming_keys_and_shapes(name, gumbel):
    cfg = TAMING_CONFIGS[name]
    with torch.device("meta"):
        model = VQVAE(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = taming_reference_shapes(128, cfg.ch_mult, 2, cfg.attn_resolutions, 256, 256, 256, cfg.num_embeddings, gumbel)
    assert ours == ref
    # spot checks straight from taming's published configs
    assert ours["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert ours["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert ours["decoder.conv_out.weight"] == (3, 128, 3, 3)
    if gumbel:
        assert ours["quantize.proj.weight"] == (8192, 256, 1, 1) and ours["quantize.embed.weight"] == (8192, 256)
        assert "encoder.down.3.attn.1.q.weight" in ours and "decoder.up.3.attn.2.proj_out.bias" in ours  # 32x32
    else:
        assert ours["quantize.embedding.weight"] == (16384, 256)
        assert "encoder.down.4.attn.1.k.weight" in ours and "decoder.up.4.attn.2.v.weight" in ours  # 16x16
    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}  # taming's Normalize
    assert model.grid == ((32, 32) if gumbel else (16, 16))


class ModelCheckpoint:  # stands for Lightning's callback class, which a .ckpt names as a dict key
    def __init__(self, monitor):
        self.monitor = monitor


@pytest.mark.parametrize("gumbel", [True, False])
def test_taming_checkpoint_loads_strict(tmp_path, gumbel):
    ch_mult, attn, res = (1, 1, 2), (8,), 32
    ref = taming_reference_shapes(32, ch_mult, 2, attn, res, 32, 32, 64, gumbel)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(*shape, generator=g) * 0.1 for k, shape in ref.items()}
    extra = {"loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4), "loss.logvar": torch.zeros(())}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {**sd, **extra}, "global_step": 1000, "epoch": 3,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
                "hyper_parameters": ModelCheckpoint("val/rec_loss")}, path)
    model = load_taming_checkpoint(path, image_size=res)
    assert model.cfg.ch_mult == ch_mult and model.cfg.attn_resolutions == attn and model.cfg.num_res_blocks == 2
    assert model.cfg.codebook == ("gumbel" if gumbel else "learned") and model.num_codes == 64
    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k
    # tokens: nearest code (VQ) or the argmax of the 1x1-conv logits (Gumbel), computed here independently
    x = images(2, size=32)
    h = model.quant_conv(model.encoder(x))
    if gumbel:
        expected = torch.nn.functional.conv2d(h, sd["quantize.proj.weight"], sd["quantize.proj.bias"]).argmax(1)
    else:
        flat = h.permute(0, 2, 3, 1).reshape(-1, 32)
        expected = torch.cdist(flat, sd["quantize.embedding.weight"]).argmin(1)
    assert torch.equal(model.encode(x).flatten(), expected.flatten())
    # and the pruned model saves / loads as a vqd folder
    model.set_code_remap(model.encode(x).unique())
    model.save(tmp_path / "tok")
    assert torch.equal(load_tokenizer(tmp_path / "tok").encode(x), model.encode(x))


def test_infer_config_matches_paper_config_on_meta():
    with torch.device("meta"):
        sd = VQVAE(TAMING_CONFIGS["f8_8192_gumbel"]).state_dict()
    cfg = infer_taming_config(sd, image_size=256)
    ref = TAMING_CONFIGS["f8_8192_gumbel"]
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "num_embeddings",
                "codebook"):
        assert getattr(cfg, key) == getattr(ref, key), key


def test_taming_loader_refuses_non_checkpoints(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="state dict"):
        load_taming_checkpoint(bad)
    with pytest.raises(ValueError, match="not a file"):
        load_taming_checkpoint(tmp_path / "missing.ckpt")


def test_code_vectors_are_what_decode_looks_up():
    m = VQVAE(VQVAEConfig(**TINY)).eval()
    m.set_code_remap(torch.tensor([3, 0, 9, 5]))
    vectors = m.code_vectors()
    assert vectors.shape == (4, m.cfg.embed_dim)
    ids = torch.tensor([[1, 2, 3, 0] * 16])
    grid = m.grid
    looked_up = m.quantize.lookup(m.code_map[ids].view(1, *grid))
    assert torch.equal(vectors[ids].view(1, *grid, -1).permute(0, 3, 1, 2), looked_up)
