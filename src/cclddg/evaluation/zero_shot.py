"""Zero-shot classification of held-out shapes images by text prompts: how well an embedder reads them.

Every image is matched against one prompt per (colour, shape, position) combination ("a red circle in
the top left"); the best prompt's attributes are its prediction. The same with paraphrased wordings the
captions never use ("a crimson disc in the upper left") shows whether unseen words land near their meaning.
"""

from __future__ import annotations

import itertools

import torch

from cclddg.data.shapes import COLORS, POSITIONS, SHAPES, ShapesDataset
from cclddg.encoders.base import Embedder

# Wordings no shapes caption uses.
COLOR_PARAPHRASES = {"red": "crimson", "green": "emerald", "blue": "navy", "yellow": "golden", "purple": "violet",
                     "orange": "tangerine", "white": "snow-white", "black": "jet-black"}
SHAPE_PARAPHRASES = {"circle": "disc", "square": "box", "triangle": "pyramid"}
POSITION_PARAPHRASES = {"top left": "in the upper left", "top": "near the top edge", "top right": "in the upper right",
                        "left": "on the left side", "center": "in the middle", "right": "on the right side",
                        "bottom left": "in the lower left", "bottom": "near the bottom edge",
                        "bottom right": "in the lower right"}
HELD_OUT_SEED = 1_000_003  # a dataset seed no training run uses by default
# Free-form prompts no caption uses, with what they mean (the attributes they name).
EXAMPLE_PARAPHRASES = {
    "a crimson disc": {"color": "red", "shape": "circle"},
    "a tiny sun-coloured triangle": {"color": "yellow", "shape": "triangle", "size": "small"},
    "an emerald box in the upper left": {"color": "green", "shape": "square", "position": "top left"},
    "a violet ball at the very bottom": {"color": "purple", "shape": "circle", "position": "bottom"},
    "a snow-white square in the middle": {"color": "white", "shape": "square", "position": "center"},
}


def position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"in the {position}" if " " in position else (f"at the {position}" if position in ("top", "bottom") else f"on the {position}")


def prompt_table(paraphrase: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """One prompt per colour x shape x position, with the attributes it names."""
    prompts, attrs = [], []
    for color, shape, position in itertools.product(COLORS, SHAPES, POSITIONS):
        if paraphrase:
            prompts.append(f"a {COLOR_PARAPHRASES[color]} {SHAPE_PARAPHRASES[shape]} {POSITION_PARAPHRASES[position]}")
        else:
            prompts.append(f"a {color} {shape} {position_phrase(position)}")
        attrs.append({"color": color, "shape": shape, "position": position})
    return prompts, attrs


@torch.no_grad()
def zero_shot_shapes(embedder: Embedder, n: int = 1000, size: int = 32, seed: int = HELD_OUT_SEED,
                     paraphrase: bool = False) -> dict[str, float]:
    """Per-attribute accuracy (%) of prompt matching on `n` held-out images."""
    data = ShapesDataset(size=size, seed=seed)
    images, _, _ = data.get_batch(range(n))
    truth = [data.sample(i).attrs for i in range(n)]
    prompts, prompt_attrs = prompt_table(paraphrase)
    text = embedder.embed_texts(prompts)
    image = embedder.embed_images(images)
    best = (image @ text.T).argmax(dim=1).tolist()
    report = {}
    for attr in ("color", "shape", "position"):
        hits = sum(prompt_attrs[b][attr] == t[attr] for b, t in zip(best, truth))
        report[attr] = 100.0 * hits / n
    report["all_three"] = 100.0 * sum(all(prompt_attrs[b][a] == t[a] for a in ("color", "shape", "position"))
                                      for b, t in zip(best, truth)) / n
    return report


@torch.no_grad()
def paraphrase_retrieval(embedder: Embedder, n: int = 1000, size: int = 32, seed: int = HELD_OUT_SEED,
                         k: int = 20) -> dict[str, float]:
    """For each example paraphrase: % of its top-k held-out images that have every attribute it names."""
    data = ShapesDataset(size=size, seed=seed)
    images, _, _ = data.get_batch(range(n))
    truth = [data.sample(i).attrs for i in range(n)]
    sims = embedder.embed_texts(list(EXAMPLE_PARAPHRASES)) @ embedder.embed_images(images).T
    report = {}
    for (prompt, wanted), row in zip(EXAMPLE_PARAPHRASES.items(), sims):
        top = row.topk(min(k, n)).indices.tolist()
        report[prompt] = 100.0 * sum(all(truth[i][a] == v for a, v in wanted.items()) for i in top) / len(top)
    return report
