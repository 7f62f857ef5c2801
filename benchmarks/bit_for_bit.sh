#!/usr/bin/env bash
# Behaviour unchanged by a structural change? Trains and samples the same tiny runs (a label DDGAN, an unconditional
# one, a DDPM, the own autoencoder and CLOOB, a latent text run on them) with this tree and with COMMIT's, same flags
# and seeds, then compares every safetensors tensor, every sample and training grid (from the CLI and from the
# exported folders through CCLDDGPipeline), and an eval's KID; and samples COMMIT's runs and model folders with this
# tree (old runs load, and give the same images). A tree whose `cclddg sample` has --decode_dtype samples with
# float32 decoding (its default decodes in bf16 on a CPU with native bf16). Exit 1 on any difference.
#     bash benchmarks/bit_for_bit.sh 4a85361
set -euo pipefail
base=${1:?give the commit to compare with}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/base" 2> /dev/null || true; rm -rf "$work"' EXIT
git -C "$root" worktree add -q "$work/base" "$base"
c="python -m cclddg"
train() {  # SRC OUT: the runs, their grids and checkpoints, the exported folders
    export PYTHONPATH=$1/src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
    local o=$2
    local t="--img_size 16 --n_channels_unet 8 --ch_mults 1,2 --is_attn 0,0 --n_channels_disc 8 --ch_mults_disc 1,2
             --is_attn_disc 0,0 --batch_size 4 --z_dim 4 --n_z_channels 8 --n_cond_channels 8 --no_progress
             --n_batches 6 --log_images_every 3 --tensorboard false"
    $c train --out $o/gan --preset fast $t --cond_map_size 0 > /dev/null
    $c train --out $o/ddpm --preset diffusion --n_steps 20 $t > /dev/null
    $c train --out $o/none --preset fast $t --cond none > /dev/null
    $c train-ae --out $o/ae --img_size 16 --widths 8,16 --latent_channels 3 --norm_groups 4 --crop 0 --train_size 64 \
        --batch_size 8 --n_batches 4 --eval_size 8 --no_progress > /dev/null
    $c train-cloob --out $o/cloob --img_size 16 --widths 8,16 --dim 16 --train_size 64 --batch_size 16 --eval_size 16 \
        --n_batches 4 --warmup 2 --no_progress > /dev/null
    $c train --out $o/text --preset fast $t --cond_map_size 0 --data_size 32 --autoencoder own:$o/ae \
        --encoder cloob-tiny:$o/cloob --cache_dir $o/cache > /dev/null
    for m in gan ddpm none text; do $c export $o/$m $o/$m-model > /dev/null; done
}
samples() {  # SRC RUNS OUT: samples of the runs in RUNS, from the CLI and CCLDDGPipeline, written to OUT
    export PYTHONPATH=$1/src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
    local r=$2 o=$3 fp32=""
    mkdir -p $o
    if $c sample --help | grep -- --decode_dtype > /dev/null; then fp32="--decode_dtype float32"; fi  # not bf16 where native
    $c sample --checkpoint $r/none --n 4 -o $o/none.png --no_progress > /dev/null
    $c sample --checkpoint $r/gan --attrs color=red --cfg 1,2 --n 4 -o $o/gan.png --no_progress > /dev/null
    $c sample --checkpoint $r/ddpm --attrs color=red --cfg 2 --n 4 --sampler ddpm -o $o/ddpm.png --no_progress > /dev/null
    $c sample --checkpoint $r/ddpm --attrs color=red --cfg 2 --n 4 --sampler ddim --steps 5 -o $o/ddim.png \
        --no_progress > /dev/null
    $c sample --checkpoint $r/text --prompt "a red circle" --cfg 1,3 --n 3 $fp32 -o $o/text.png --no_progress > /dev/null
    $c sample --checkpoint $r/text-model --prompt "a red circle" --cfg 1,3 --n 3 $fp32 -o $o/text-model.png \
        --no_progress > /dev/null
    $c eval --checkpoint $r/text --data shapes:16 --metrics kid --n 20 2> /dev/null | grep '"kid"' > $o/kid.txt
    python - "$r" "$o" <<'PIPE'
import sys
import torch
from cclddg import CCLDDGPipeline
r, o = sys.argv[1:]
calls = {"gan": dict(attrs="color=red", guidance_scale=2.0), "gan-noattrs": dict(),
         "ddpm": dict(attrs="color=red", guidance_scale=2.0, num_inference_steps=5), "none": dict(),
         "text": dict(prompt="a red circle", negative_prompt="a blue square", guidance_scale=2.0)}
for name, kwargs in calls.items():
    pipe = CCLDDGPipeline.from_pretrained(f"{r}/{name.split('-')[0]}-model")
    images = pipe(num_images_per_prompt=3, generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs)
    torch.save(images.images, f"{o}/pipe-{name}.pt")
PIPE
}
train "$work/base" "$work/old"
samples "$work/base" "$work/old" "$work/old/samples"
train "$root" "$work/new"
samples "$root" "$work/new" "$work/new/samples"
samples "$root" "$work/old" "$work/cross/samples"  # the base's runs and folders, sampled by this tree
python - "$work" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

work = Path(sys.argv[1])


def compare(old: Path, new: Path) -> tuple[int, list[str]]:
    bad, files = [], 0
    kept = (".png", ".txt", ".safetensors")
    for a in sorted(p for p in old.rglob("*") if (p.suffix in kept or p.name.startswith("pipe-")) and "cache" not in p.parts):
        b, files = new / a.relative_to(old), files + 1
        if not b.is_file():
            bad.append(f"{b} is missing")
        elif a.suffix in (".safetensors", ".pt"):  # .pt: a pipeline's images
            x, y = (load_file(a), load_file(b)) if a.suffix == ".safetensors" else ({0: torch.load(a)}, {0: torch.load(b)})
            if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
                bad.append(str(a.relative_to(old)))
        elif a.read_bytes() != b.read_bytes():
            bad.append(str(a.relative_to(old)))
    return files, bad


files, bad = compare(work / "old", work / "new")
print(f"bit for bit, {files} files (weights, grids, samples, KID): " + ("the same" if not bad else "DIFFERENT: " + ", ".join(bad)))
cross_files, cross_bad = compare(work / "old" / "samples", work / "cross" / "samples")
print(f"the base's runs and model folders sampled by this tree, {cross_files} files: "
      + ("the same" if not cross_bad else "DIFFERENT: " + ", ".join(cross_bad)))
sys.exit(1 if bad or cross_bad or not files or not cross_files else 0)
PY
