import json

import pytest
import torch

from sparsify_cli.config.compose import compose
from sparsify_cli.errors import UserError
from sparsify_cli.pack import PackOptions, load_packed, pack_checkpoint, read_manifest
from sparsify_cli.pack import layout
from sparsify_cli.pack.packed import file_digest
from sparsify_cli.train import checkpoint as ckpt
from sparsify_cli.train.loop import Trainer

DEAD = [0, 5, 17]  # neurons of layer 0 whose gate rows are zeroed: relu(0) = 0, so they never fire


@pytest.fixture
def trained(small_overrides, tmp_path):
    trainer = Trainer(compose("tiny", small_overrides + ["train.max_steps=3"]), tmp_path / "run")
    trainer.run()
    with torch.no_grad():
        trainer.model.blocks[0].ffn.gate.weight[DEAD] = 0
    trainer.save()
    return tmp_path / "run", small_overrides


def data_overrides(small_overrides):
    return [o for o in small_overrides if o.startswith("data.")]


def test_pack_prunes_dead_neurons_and_matches_the_checkpoint(trained, tmp_path):
    run, overrides = trained
    manifest = pack_checkpoint(run, tmp_path / "packed", PackOptions(calib_tokens=256), data_overrides(overrides))
    layer0 = manifest["layers"][0]
    assert layer0["d_ffn_source"] == 64 and layer0["stats"]["dead"] >= len(DEAD)
    assert layer0["d_ffn"] == 64 - layer0["stats"]["dead"]
    for layer in manifest["layers"]:
        assert layer["compression"] in (2, 4, 8, 16) and layer["tile"] % 32 == 0
        assert 0 <= layer["stats"]["overflow_fraction"] <= 1
        assert layer["stats"]["mean_active"] <= layer["stats"]["p99_active"] <= layer["stats"]["max_active"]
    # On the calibration tokens only summation order differs: fp32 rounding.
    assert manifest["agreement"]["calibration"]["max_abs_logit_diff"] < 1e-4
    assert manifest["source"]["model_sha256"] == file_digest(run / "checkpoint" / "model.safetensors")

    model, _ = load_packed(tmp_path / "packed", kernels="torch")
    source, _ = ckpt.load_model(run)
    index = model.ffns[0].neuron_index
    assert not set(DEAD) & set(index.tolist())
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        # Dead neurons contribute exactly zero everywhere (zero gate rows), so any input agrees.
        assert torch.allclose(model(x), source.eval()(x), atol=1e-4)
    assert model.ffn_backend == "torch"


def test_packed_dir_tampering_and_versions_are_refused(trained, tmp_path):
    run, overrides = trained
    out = tmp_path / "p"
    pack_checkpoint(run, out, PackOptions(calib_tokens=128), data_overrides(overrides))
    manifest_path = out / "manifest.json"
    original = manifest_path.read_text()

    m = json.loads(original)
    m["layers"][0]["compression"] = 16
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(UserError, match="modified after packing"):
        read_manifest(out)

    m = json.loads(original)
    m["format_version"] = 99
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(UserError, match="format version 99"):
        load_packed(out)

    manifest_path.write_text(original)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest"):
        load_packed(out)


def test_pack_refuses_bad_input(trained, small_overrides, tmp_path):
    run, overrides = trained
    with pytest.raises(UserError, match="not a sparsify checkpoint"):
        pack_checkpoint(tmp_path, tmp_path / "o1", PackOptions())
    dense = Trainer(compose("tiny", small_overrides + ["train.max_steps=1", "model.activation=silu"]), tmp_path / "dense")
    dense.run()
    with pytest.raises(UserError, match="dense model .*silu"):
        pack_checkpoint(tmp_path / "dense", tmp_path / "o2", PackOptions(), data_overrides(overrides))
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("the king " * 400)
    (short / "b.txt").write_text("the queen")
    with pytest.raises(UserError, match="no calibration text"):
        pack_checkpoint(run, tmp_path / "o3", PackOptions(), [f"data.path={short}"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        pack_checkpoint(run, tmp_path / "busy", PackOptions())
    with pytest.raises(UserError, match="only data.key=value"):
        pack_checkpoint(run, tmp_path / "o4", PackOptions(), ["train.seq_len=8"])
    with pytest.raises(UserError, match="--reorder"):
        PackOptions(reorder="random")


def test_balance_order_evens_tile_loads():
    fires = torch.tensor([100, 90, 80, 70, 0, 5, 4, 3, 2, 1], dtype=torch.int64)
    order, n_hot = layout.neuron_order(fires, tile=3, reorder="balance")
    assert n_hot == 0
    assert sorted(order.tolist()) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # neuron 4 never fired: pruned
    loads = [int(fires[order[i:i + 3]].sum()) for i in range(0, len(order), 3)]
    naive = [int(fires[(fires > 0).nonzero().flatten()[i:i + 3]].sum()) for i in range(0, 9, 3)]
    assert max(loads) < max(naive)
    assert layout.neuron_order(fires, 3, "none")[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]


def test_hot_order_puts_frequent_neurons_first_and_counts_them():
    fires = torch.zeros(300, dtype=torch.int64)
    fires[torch.arange(0, 300, 3)] = 50  # 100 neurons at rate 5% of 1000 tokens: hot
    fires[torch.arange(1, 300, 3)] = 1  # 100 rare ones; the last 100 never fire (pruned)
    order, n_hot = layout.neuron_order(fires, tile=256, reorder="hot", tokens=1000)
    assert order.numel() == 200 and n_hot == 128  # 100 hot, rounded up to a multiple of 128
    assert (fires[order[:100]] == 50).all() and (fires[order[100:]] == 1).all()


def test_compression_covers_the_percentile_with_margin():
    hist = torch.zeros(257, dtype=torch.int64)
    hist[10] = 9990
    hist[200] = 10  # 0.1% outliers
    assert layout.hist_quantile(hist, 0.999) == 10
    assert layout.choose_compression(256, hist, 1.25) == 16  # capacity 15 >= ceil(12.5)
    assert layout.overflow_fraction(hist, 15) == pytest.approx(0.001)
    hist[10], hist[40] = 0, 9990
    assert layout.choose_compression(256, hist, 1.25) == 4  # need 50: C=8 gives 31, C=4 gives 63
    assert layout.choose_tile(40) == 64 and layout.choose_tile(5000) == 256


def test_pack_cli_prints_the_summary(trained, tmp_path):
    from typer.testing import CliRunner

    from sparsify_cli.cli.app import app

    run, overrides = trained
    r = CliRunner().invoke(app, ["pack", str(run), "--out", str(tmp_path / "cli"), "--calib-tokens", "128",
                                 *data_overrides(overrides)])
    assert r.exit_code == 0, r.output
    assert "agreement with the checkpoint" in r.output and (tmp_path / "cli" / "manifest.json").is_file()
    bad = CliRunner().invoke(app, ["pack", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_an_observed_packed_layer_with_weights_in_another_dtype():
    """On the CUDA backend load_packed keeps FFN weights in bf16 inside an fp32 model: an observer (eval's
    statistics) must still see the layer's activations, computed as the forward computes them."""
    from sparsify_cli.pack.packed import PackedFFN

    h, d = 128, 64
    gen = torch.Generator().manual_seed(0)
    w = {k: torch.randn(h, d, generator=gen).to(torch.bfloat16) for k in ("gate_w", "up_w", "down_t")}
    ffn = PackedFFN(0, True, w, {"tile": 256, "compression": 8, "stats": {"mean_active": 2.0}})
    seen = []
    ffn.observer = lambda layer, h_act: seen.append(h_act)
    x = torch.randn(2, 3, d, generator=gen)
    y = ffn(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    xb = x.to(torch.bfloat16)
    want = torch.relu(xb @ w["gate_w"].T) * (xb @ w["up_w"].T)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], want)
