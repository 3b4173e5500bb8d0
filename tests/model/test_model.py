import torch
import torch.nn.functional as F

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.model import SparseLlama


def make(**kw) -> SparseLlama:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16)
    torch.manual_seed(0)
    return SparseLlama(ModelConfig(**{**base, **kw}))


def test_shapes_and_tied_head():
    model = make()
    logits = model(torch.randint(0, 50, (3, 10)))
    assert logits.shape == (3, 10, 50)
    assert model.lm_head.weight is model.embed.weight
    assert make(tie_embeddings=False).lm_head.weight is not make(tie_embeddings=False).embed.weight


def test_causal_masking():
    """Changing a later token must not change earlier logits."""
    model = make(n_kv_heads=2)  # grouped KV heads on the way
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_gated_relu_ffn_matches_formula():
    model = make(mlp_bias=True)
    ffn = model.blocks[0].ffn
    x = torch.randn(5, 32)
    h = F.relu(x @ ffn.gate.weight.T + ffn.gate.bias) * (x @ ffn.up.weight.T + ffn.up.bias)
    assert torch.allclose(ffn(x), h @ ffn.down.weight.T + ffn.down.bias, atol=1e-5)
    assert (ffn.activations(x) == 0).any()  # ReLU gives exact zeros


def test_plain_and_silu_ffns():
    plain = make(ffn="plain").blocks[0].ffn
    assert plain.gate is None
    x = torch.randn(4, 32)
    assert torch.allclose(plain.activations(x), F.relu(plain.up(x)))
    silu = make(activation="silu").blocks[0].ffn
    assert torch.allclose(silu.activations(x), F.silu(silu.gate(x)) * silu.up(x))


def test_attention_biases_exist_when_asked():
    model = make(attn_bias=True)
    assert model.blocks[0].attn.q.bias is not None and model.blocks[0].attn.o.bias is None


def test_activation_checkpointing_gives_same_gradients():
    x = torch.randint(0, 50, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = make()
        model.activation_checkpointing = ckpt
        model(x).sum().backward()
        grads.append(model.blocks[0].ffn.gate.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_rope_matches_rotation_of_pairs():
    """apply_rotary rotates (x_i, x_{i+hd/2}) by angle pos·θ_i: check one position by hand."""
    from sparsify_cli.model.transformer import apply_rotary, rotary_tables

    cos, sin = rotary_tables(4, 8, 10000.0)
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]]).expand(1, 8, 1, 4)  # (B, T, nh, hd)
    out = apply_rotary(x, cos, sin)[:, :, 0]  # (B, T, hd)
    pos, theta0, theta1 = 3, 1.0, 10000.0 ** (-2 / 4)
    a0, a1 = pos * theta0, pos * theta1
    expect = torch.tensor([
        1 * torch.cos(torch.tensor(a0)) - 3 * torch.sin(torch.tensor(a0)),
        2 * torch.cos(torch.tensor(a1)) - 4 * torch.sin(torch.tensor(a1)),
        3 * torch.cos(torch.tensor(a0)) + 1 * torch.sin(torch.tensor(a0)),
        4 * torch.cos(torch.tensor(a1)) + 2 * torch.sin(torch.tensor(a1)),
    ])
    assert torch.allclose(out[0, pos], expect, atol=1e-5)


def test_rotary_backward_is_the_inverse_rotation():
    """apply_rotary's hand-written backward equals autograd through the formula (fp32 math), also for a strided
    incoming gradient (as attention hands it back)."""
    from sparsify_cli.model.transformer import apply_rotary, rotary_tables

    cos, sin = rotary_tables(8, 16, 10000.0)
    x = torch.randn(2, 16, 3, 8, requires_grad=True)
    g = torch.randn(2, 3, 16, 8).transpose(1, 2)  # (B, T, nh, hd) view of a (B, nh, T, hd) tensor
    (apply_rotary(x, cos, sin) * g).sum().backward()
    got, x.grad = x.grad, None
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x.chunk(2, -1)
    (torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1) * g).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-6)
