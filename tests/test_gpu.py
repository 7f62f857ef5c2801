"""What only a GPU can show: training in bf16 on CUDA, R1 through fused attention kernels, and that a model
samples the same images on the GPU as on the CPU for the same (CPU) generator. Skipped where there is no CUDA."""

from __future__ import annotations

import pytest
import torch

from cclddg import CCLDDGPipeline
from cclddg.cli import main
from cclddg.models import Discriminator

pytestmark = pytest.mark.gpu

PROMPT = "a red circle in the top left"


def test_training_in_bf16_on_the_gpu_and_sampling_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--preset", "fast", "--img_size", "16", "--n_channels_unet", "8",
                 "--ch_mults", "1,2", "--is_attn", "0,1", "--n_channels_disc", "8", "--ch_mults_disc", "1,2",
                 "--is_attn_disc", "0,1", "--batch_size", "8", "--n_batches", "16", "--lazy_reg", "2",
                 "--mixed_precision", "bf16", "--channels_last", "true", "--no_progress"]) == 0
    assert main(["sample", "--checkpoint", str(out), "--attrs", "color=red", "--n", "4",
                 "-o", str(tmp_path / "grid.png"), "--no_progress"]) == 0


def test_r1_through_fused_attention_kernels_on_the_gpu():
    from cclddg.objectives import ddgan

    disc = Discriminator(image_channels=4, n_channels=32, ch_mults=(1, 2, 2), is_attn=(True, True, True),
                         n_blocks=1, cond_dim=0, sample_size=8).cuda()
    x, x_t = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.tensor([1, 2], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, logs = ddgan.discriminator_loss(disc, x, x.flip(0), x_t, t, None, r1_weight=1.0)
    loss.backward()
    assert logs["r1"] >= 0 and torch.isfinite(loss)


def test_a_model_samples_the_same_on_the_gpu_as_on_the_cpu(tiny_models):
    pipe = CCLDDGPipeline.from_pretrained(tiny_models["text"])
    cpu = pipe(prompt=PROMPT, num_images_per_prompt=4, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    gpu = pipe.to("cuda")(prompt=PROMPT, num_images_per_prompt=4, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(cpu, gpu.cpu(), atol=2e-3)
