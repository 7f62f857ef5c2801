"""The tiny configurations the tests build from, in one place: 16 px images, nets 8 channels wide. A test that
needs more (more steps, a bigger training set) states only what it changes, with `with_flags`."""

from __future__ import annotations

# The generator's and the discriminator's widths, z and the condition's channels.
NETS = ["--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0", "--n_channels_disc", "8",
        "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--z_dim", "4", "--n_z_channels", "8",
        "--n_cond_channels", "8"]
# `cclddg train` on 16 px shapes, batch 4.
TRAIN = ["--img_size", "16", *NETS, "--batch_size", "4", "--no_progress"]
# The fast preset, 3 steps on 32 examples, no spatial conditioning map (the fixtures' runs).
GEN = ["--preset", "fast", *TRAIN, "--cond_map_size", "0", "--data_size", "32", "--n_batches", "3"]
# `cclddg train-ae`: a two-level autoencoder, 4 steps.
AE = ["--img_size", "16", "--widths", "8,16", "--latent_channels", "3", "--norm_groups", "4", "--crop", "0",
      "--train_size", "64", "--batch_size", "8", "--n_batches", "4", "--eval_size", "8", "--no_progress"]
# `cclddg train-cloob`: a two-level image tower, 16-d embeddings, 4 steps.
CLOOB = ["--img_size", "16", "--widths", "8,16", "--dim", "16", "--train_size", "64", "--batch_size", "16",
         "--eval_size", "16", "--n_batches", "4", "--warmup", "2", "--no_progress"]


def with_flags(base: list[str], *pairs: str, drop: tuple[str, ...] = ()) -> list[str]:
    """`base` without the flags in `drop` (and their values) and with each (flag, value) of `pairs` set: replaced
    where the flag is there, else added before a final `--no_progress` (which stays last)."""
    if len(pairs) % 2:
        raise ValueError(f"with_flags takes (flag, value) pairs, got {pairs}")
    out = list(base)
    for flag in drop:
        i = out.index(flag)
        del out[i:i + 2]
    for flag, value in zip(pairs[::2], pairs[1::2]):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            end = len(out) - 1 if out and out[-1] == "--no_progress" else len(out)
            out[end:end] = [flag, value]
    return out
