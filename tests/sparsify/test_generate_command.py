"""`sparsify generate` end to end on tiny random Wan components built offline: a tokenizer,
a UMT5 encoder, a Wan VAE and a diffusers DiT checkpoint; the MP4 is read back."""

from __future__ import annotations

import pytest
import torch

from sparsify.cli import main

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
imageio = pytest.importorskip("imageio.v2")
pytest.importorskip("imageio_ffmpeg")

WORDS = ("a", "cat", "walks", "on", "the", "moon", "under", "red", "sky")
DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5's tokenizer appends </s> to every text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    encoder = transformers.UMT5Config(
        vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    transformers.UMT5EncoderModel(encoder).save_pretrained(root / "text_encoder")
    diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        latents_mean=[0.0, 0.5, -0.5, 0.0], latents_std=[1.0, 2.0, 0.5, 1.0],
    ).save_pretrained(root / "vae")  # fmt: skip
    diffusers.WanTransformer3DModel(**DIT).save_pretrained(root / "dit")
    return root


def _generate(wan_dir, out, *extra):
    return main(
        ["generate", "--checkpoint", str(wan_dir / "dit"), "--wan-dir", str(wan_dir),
         "--prompt", "a cat walks on the moon", "--seconds", "1", "--height", "32",
         "--width", "48", "--out", str(out), *extra]
    )  # fmt: skip


@pytest.mark.parametrize("mode", [["--dense"], ["--pattern", "persistent-local"]])
def test_generate_writes_a_playable_mp4(wan_dir, tmp_path, mode, capsys):
    out = tmp_path / "video.mp4"
    assert _generate(wan_dir, out, *mode) == 0
    assert "wrote" in capsys.readouterr().out
    reader = imageio.get_reader(out, format="FFMPEG")
    try:
        # 1 s at 16 fps -> 5 latent frames -> 2 chunks = 6 latent frames -> 1 + 4 * 5 frames
        assert reader.count_frames() == 21
        assert reader.get_meta_data()["size"] == (48, 32)
        frame = reader.get_data(10)
        assert frame.shape == (32, 48, 3) and frame.std() > 0
    finally:
        reader.close()


def test_prompt_embeddings_are_padded_with_zeros(wan_dir):
    from runtime.wan_assets import encode_prompt, load_wan_assets

    assets = load_wan_assets(wan_dir, "cpu", torch.float32)
    context = encode_prompt(assets, "a cat walks", 6, expected_dim=32)
    assert context.shape == (1, 6, 32)
    assert (context[0].abs().sum(-1) > 0).tolist() == [True] * 4 + [False] * 2  # 3 words + </s>
    assert encode_prompt(assets, " ".join(WORDS * 2), 6).shape == (1, 6, 32)  # truncated
    with pytest.raises(ValueError, match="width 32 is not the model's text_dim 64"):
        encode_prompt(assets, "a cat", 6, expected_dim=64)


def test_missing_files_are_one_line_and_exit_2(wan_dir, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--wan-dir",
                 str(wan_dir), "--prompt", "x"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert (
        err == f"sparsify generate: missing the checkpoint: {tmp_path / 'none.pt'} does not exist"
    )
    empty = tmp_path / "wan"
    (empty / "vae").mkdir(parents=True)
    assert main(["generate", "--checkpoint", str(wan_dir / "dit"), "--wan-dir", str(empty),
                 "--prompt", "x"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"looked for config.json in {empty / 'vae'}" in err


def test_broken_checkpoint_is_one_line_and_exit_2(wan_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    assert main(["generate", "--checkpoint", str(bad), "--wan-dir", str(wan_dir),
                 "--prompt", "x"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: not a readable safetensors file" in err
