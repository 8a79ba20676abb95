"""Image tokenizers: one interface (encode -> codes [N, h, w], decode -> images), found through
the recipe's ``tokenizer:`` section, on tiny random configs of every kind."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flashar_adapt as fa
from flashar_adapt.integrations.llamagen import VQ_16, LlamaGenVQTokenizer, VQModel, VQModelArgs, load_vq
from flashar_adapt.tokenizers import ImageTokenizer, TokenizerError, decode_images, list_tokenizers, load_tokenizer
from tests import tiny


def _images(n, c, h, w, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _contract(tok: ImageTokenizer, n: int = 3, seed: int = 0) -> torch.Tensor:
    """The interface every kind keeps: shapes, code range, decode(encode(x)) runs and lies in [0, 1]."""
    x = _images(n, tok.channels, *tok.image_size, seed=seed)
    codes = tok.encode(x)
    assert codes.shape == (n, *tok.grid) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
    y = tok.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(TokenizerError, match="images must be"):
        tok.encode(x[:, :, :-1])
    with pytest.raises(TokenizerError, match="codes must lie"):
        tok.decode(torch.full((1, *tok.grid), tok.codebook_size))
    return codes


def test_shipped_kinds_are_registered():
    assert {"color-clusters", "fmnist-patch-vq", "llamagen-vq", "transformers-vq"} <= set(list_tokenizers())


# ---------------------------------------------------------------- colour clusters


def _palette(tmp_path, k=16, c=3, seed=0, fmt="safetensors"):
    g = torch.Generator().manual_seed(seed)
    clusters = torch.rand(k, c, generator=g) * 2 - 1  # in the normalised space [-1, 1]
    path = tmp_path / f"clusters.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"clusters": clusters.tolist()}))
    else:
        save_file({"clusters": clusters}, str(path))
    return path, clusters


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_color_clusters_round_trip_is_exact(tmp_path_factory, h, w, k, seed):
    """decode paints the cluster colour; re-encoding it finds the same cluster (distance 0),
    for any grid and palette (random palettes never have two equal colours)."""
    path, _ = _palette(tmp_path_factory.mktemp("p"), k=k, seed=seed)
    r = tiny.hf_llama_recipe(codebook=k, grid=(h, w)).replace(
        tokenizer={"kind": "color-clusters", "checkpoint": str(path)}
    )
    tok = load_tokenizer(r)
    assert tok.exact_roundtrip and tok.grid == (h, w) and tok.image_size == (h, w)
    codes = _contract(tok, seed=seed)
    assert torch.equal(tok.encode(tok.decode(codes)), codes)


def test_color_clusters_json_palette_and_bad_files(tmp_path):
    path, clusters = _palette(tmp_path, k=8, fmt="json")
    r = tiny.hf_llama_recipe(codebook=8, grid=(2, 3)).replace(
        tokenizer={"kind": "color-clusters", "checkpoint": str(path)}
    )
    tok = load_tokenizer(r)
    assert torch.allclose(tok.clusters, clusters)
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(r)
    missing = r.replace(**{"tokenizer.checkpoint": str(tmp_path / "nope.safetensors")})
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(missing)


# ---------------------------------------------------------------- recipe checks


def test_tokenizer_grid_disagreeing_with_the_recipe_is_refused(tmp_path):
    path, _ = _palette(tmp_path, k=8)
    base = tiny.hf_llama_recipe(codebook=8, grid=(4, 4))
    with pytest.raises(fa.RecipeError, match=r"tokenizer.image_size: .*image.grid is \[4, 4\]"):
        base.replace(
            tokenizer={"kind": "color-clusters", "checkpoint": str(path), "image_size": [4, 6], "downsample": 1}
        )
    with pytest.raises(fa.RecipeError, match="tokenizer.knd: unknown key"):
        base.replace(tokenizer={"knd": "color-clusters"})
    with pytest.raises(fa.RecipeError, match="tokenizer.mean"):
        base.replace(tokenizer={"kind": "color-clusters", "mean": [0.5]})
    with pytest.raises(fa.RecipeError, match="tokenizer.kind: unknown tokenizer kind 'colour-clusters'"):
        load_tokenizer(base.replace(tokenizer={"kind": "colour-clusters"}))
    with pytest.raises(fa.RecipeError, match="the tokenizer has 8 codes, but image.codebook_size is 9"):
        load_tokenizer(
            base.replace(**{"image.codebook_size": 9}, tokenizer={"kind": "color-clusters", "checkpoint": str(path)})
        )
    with pytest.raises(fa.RecipeError, match="has no tokenizer section"):
        load_tokenizer(base)


def test_recipe_yaml_round_trip_keeps_the_tokenizer_section():
    r = fa.load_recipe("janus-pro-1b")
    again = fa.recipe_from_dict(r.to_dict())
    assert again.tokenizer == r.tokenizer and r.tokenizer.module == "model.vqmodel"
    assert "tokenizer" not in fa.load_recipe("llama-image-ar").to_dict()  # absent stays absent


# ---------------------------------------------------------------- LlamaGen VQ


def _tiny_vq_args(**over):
    # GroupNorm(32) needs channel counts divisible by 32; ch_mult (1, 2) -> downsample 2
    return VQModelArgs(
        **{
            **dict(
                codebook_size=64,
                codebook_embed_dim=4,
                encoder_ch_mult=(1, 2),
                decoder_ch_mult=(1, 2),
                z_channels=32,
                ch=32,
                num_res_blocks=1,
            ),
            **over,
        }
    )


def _tiny_vq(seed=0, **over) -> VQModel:
    torch.manual_seed(seed)
    vq = VQModel(_tiny_vq_args(**over)).eval()
    tiny.randomize(vq, seed, std=0.2)
    return vq


def test_llamagen_vq_has_the_official_parameter_names():
    sd = VQ_16(ch=32, z_channels=32, codebook_embed_dim=8, codebook_size=16, num_res_blocks=2).state_dict()
    for key in (
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.conv1.weight",
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.4.attn.1.proj_out.weight",
        "encoder.mid.1.q.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.conv_blocks.0.attn.2.v.weight",
        "decoder.conv_blocks.3.upsample.conv.weight",
        "decoder.mid.2.conv2.weight",
        "quantize.embedding.weight",
        "quantize.codebook_used",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in sd, key
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd  # the deepest level does not downsample
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_llamagen_vq_checkpoint_loads_safely_with_sizes_from_the_weights(tmp_path, suffix):
    vq = _tiny_vq()
    path = tmp_path / f"vq_ds2{suffix}"
    if suffix == ".pt":  # the training layout: {"model": ..., "args": Namespace(...), ...}
        torch.save({"model": vq.state_dict(), "args": argparse.Namespace(vq_model="VQ-16"), "steps": 10}, path)
    else:
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(path))
    again = load_vq(path)
    assert again.config.encoder_ch_mult == (1, 2) and again.config.ch == 32 and again.config.codebook_size == 64
    for k, v in vq.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": vq.state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_vq(tmp_path / "evil.pt")
    # tokenizer.config overrides: a misspelt key or sizes the weights do not have are clear errors
    with pytest.raises(ValueError, match="'codebok_size' is not a VQ setting"):
        load_vq(path, codebok_size=1)
    with pytest.raises(ValueError, match="do not fit the VQ model with tokenizer.config"):
        load_vq(path, codebook_size=99)


def test_llamagen_vq_tokenizer_through_the_recipe(tmp_path):
    vq = _tiny_vq()
    path = tmp_path / "vq.pt"
    torch.save({"model": vq.state_dict()}, path)
    r = tiny.llamagen_recipe(grid=3, vocab=64).replace(**{"tokenizer.downsample": 2})
    with pytest.raises(TokenizerError, match="separate file"):
        load_tokenizer(r)
    tok = load_tokenizer(r, checkpoint=path)
    assert isinstance(tok, LlamaGenVQTokenizer) and tok.grid == (3, 3) and tok.image_size == (6, 6)
    codes = _contract(tok)
    # the model's own modules, by hand: normalise to [-1, 1], encoder, quant_conv, nearest unit codebook entry
    x = _images(3, 3, 6, 6)
    with torch.no_grad():
        z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(x * 2 - 1)).permute(0, 2, 3, 1), dim=-1)
        e = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)
        want = torch.cdist(z.reshape(-1, 4), e).argmin(1).view(3, 3, 3)
        assert torch.equal(codes, want)
        img = vq.decoder(vq.post_quant_conv(e[codes].permute(0, 3, 1, 2).contiguous()))
    assert torch.equal(tok.decode(codes), (img * 0.5 + 0.5).clamp(0, 1))  # the same ops on the same memory layout
    with pytest.raises(TokenizerError, match="downsample is 4"):
        load_tokenizer(r.replace(**{"tokenizer.downsample": 4, "image.grid": [3, 3]}), checkpoint=path)
    with pytest.raises(fa.RecipeError, match="makes a 2x2 grid"):
        load_tokenizer(r.replace(**{"tokenizer.image_size": [4, 4], "tokenizer.downsample": None}), checkpoint=path)


# ---------------------------------------------------------------- transformers VQ modules


def _hf(family):
    """(model, recipe fitted to the tiny VQ: its grid and codebook, downsample 2)."""
    if family == "janus":
        model = tiny.janus()
        r = fa.load_recipe("janus-pro-1b").replace(grid=[2, 2], **{"tokenizer.downsample": 2})  # the VQ decodes 2x2
    elif family == "emu3":
        model = tiny.emu3()
        r = fa.load_recipe("emu3-gen").replace(grid=[4, 6], **{"tokenizer.downsample": 2, "image.codebook_size": 64})
    else:
        model = tiny.chameleon()
        r = fa.load_recipe("chameleon").replace(grid=[4, 4], **{"tokenizer.downsample": 2})
    return model, r


@pytest.mark.parametrize("family", ["janus", "emu3", "chameleon"])
def test_transformers_vq_modules(family):
    model, r = _hf(family)
    with pytest.raises(TokenizerError, match="inside the model's checkpoint"):
        load_tokenizer(r)
    tok = load_tokenizer(r, model)
    assert tok.vq is model.model.vqmodel
    x = _images(2, 3, *tok.image_size)
    codes = tok.encode(x)
    assert codes.shape == (2, *r.image.grid) and 0 <= int(codes.min()) and int(codes.max()) < r.image.codebook_size
    if family == "chameleon":  # transformers' ChameleonVQVAE has an encoder only
        with pytest.raises(TokenizerError, match="has no decoder"):
            tok.decode(codes)
        return
    _contract(tok, n=2)
    with pytest.raises(TokenizerError, match="downsample is 4"):
        load_tokenizer(r.replace(**{"tokenizer.downsample": 4}), model)
    if family == "janus":
        with pytest.raises(TokenizerError, match="decodes only a 2x2 grid"):
            load_tokenizer(r.replace(grid=[3, 3]), model)


def test_transformers_vq_codes_match_the_modules_own_encode():
    model, r = _hf("janus")
    tok = load_tokenizer(r, model)
    x = _images(2, 3, 4, 4)
    with torch.no_grad():
        want = model.model.vqmodel.encode(x * 2 - 1).image_tokens.view(2, 2, 2)
        pix = model.model.vqmodel.decode(want.flatten(1))
    assert torch.equal(tok.encode(x), want)
    # the same decode; the [-1, 1] -> [0, 1] map is one multiply and one add whose order of
    # rounding may differ: at most an ulp or two of values in [0, 1] (~1e-7), on any CPU
    assert torch.allclose(tok.decode(want), (pix * 0.5 + 0.5).clamp(0, 1), atol=1e-6)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fmnist_tokenizer_round_trip_and_decode_images():
    tok = load_tokenizer("fmnist-c2i")
    assert tok.grid == (14, 14) and tok.image_size == (28, 28) and tok.channels == 1 and tok.exact_roundtrip
    codes = _contract(tok, n=4)
    assert torch.equal(tok.encode(tok.decode(codes)), codes)
    model = tiny.llamagen(grid=14, vocab=256)
    fa.patch(model, "fmnist-c2i", **{"condition.num_classes": 10})
    assert torch.equal(decode_images(model, codes), tok.decode(codes))
    assert torch.equal(fa.decode_images(model, codes), tok.decode(codes))


def test_fmnist_tokenizer_documented_psnr():
    """The PSNR docs and info.json state (29.05 dB over the 10,000 test images), re-measured.
    info.json rounds to 0.01 dB; the mean over 7.8M pixels moves far less than that between
    CPUs (float32 summation order), so +-0.01 dB holds anywhere and catches any other tokenizer."""
    from flashar_adapt.fmnist import ASSETS
    from flashar_adapt.fmnist.data import DatasetMissing, load_fmnist
    from flashar_adapt.fmnist.tokenizer import psnr

    try:
        x, _ = load_fmnist("test")
    except DatasetMissing as e:
        pytest.skip(str(e))
    documented = json.loads((ASSETS / "info.json").read_text())["tokenizer"]["test_psnr_db"]
    tok = load_tokenizer("fmnist-c2i")
    images = x[:, None].float() / 255
    assert abs(psnr(tok.decode(tok.encode(images)), images) - documented) <= 0.01
