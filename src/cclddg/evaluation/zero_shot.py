"""Zero-shot classification of held-out shapes images by text prompts: how well an embedder reads them.

Every image is matched against one prompt per (colour, shape, position) combination ("a red circle in
the top left"); the best prompt's attributes are its prediction. The same with paraphrased wordings the
captions never use ("a crimson disc in the upper left"; three per value) shows whether unseen words land near
their meaning; the text-only reference says how much of that the frozen sentence encoder itself understands.
"""

from __future__ import annotations

import itertools

import torch

from cclddg.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    article,
    request_prompt,
)
from cclddg.encoders.base import Embedder, reference_text_encoder

# Wordings no shapes caption uses: several per value (synonyms, other phrasings), for every colour, shape and
# position. Paraphrased prompt tables use variant k of each (k = 0..PARAPHRASE_VARIANTS-1).
COLOR_PARAPHRASES = {
    "red": ("crimson", "scarlet", "ruby"), "green": ("emerald", "jade", "grass-coloured"),
    "blue": ("navy", "azure", "cobalt"), "yellow": ("golden", "lemon", "canary"),
    "purple": ("violet", "plum", "amethyst"), "orange": ("tangerine", "amber", "pumpkin-coloured"),
    "white": ("snowy", "ivory", "milky"), "black": ("ebony", "inky", "coal-coloured")}
SHAPE_PARAPHRASES = {"circle": ("disc", "dot", "ball"), "square": ("box", "block", "tile"),
                     "triangle": ("pyramid", "wedge", "three-sided shape")}
POSITION_PARAPHRASES = {
    "top left": ("in the upper left", "up and to the left", "in the northwest corner"),
    "top": ("near the top edge", "up high in the middle", "at the upper edge"),
    "top right": ("in the upper right", "up and to the right", "in the northeast corner"),
    "left": ("on the left side", "by the left edge", "on the left-hand side"),
    "center": ("in the middle", "right in the middle", "at the midpoint"),
    "right": ("on the right side", "by the right edge", "on the right-hand side"),
    "bottom left": ("in the lower left", "down and to the left", "in the southwest corner"),
    "bottom": ("near the bottom edge", "down low in the middle", "at the lower edge"),
    "bottom right": ("in the lower right", "down and to the right", "in the southeast corner")}
PARAPHRASE_VARIANTS = 3
HELD_OUT_SEED = 1_000_003  # a dataset seed no training run uses by default
# Free-form prompts no caption uses, with what they mean (the attributes they name).
EXAMPLE_PARAPHRASES = {
    "a crimson disc": {"color": "red", "shape": "circle"},
    "a tiny sun-coloured triangle": {"color": "yellow", "shape": "triangle", "size": "small"},
    "an emerald box in the upper left": {"color": "green", "shape": "square", "position": "top left"},
    "a violet ball at the very bottom": {"color": "purple", "shape": "circle", "position": "bottom"},
    "a snow-white square in the middle": {"color": "white", "shape": "square", "position": "center"},
}


def paraphrase_prompt(request: dict[str, str], variant: int) -> str:
    """The request in words no caption uses ("a crimson disc in the upper left"), variant 0..2."""
    color = COLOR_PARAPHRASES[request["color"]][variant]
    return f"{article(color)} {color} {SHAPE_PARAPHRASES[request['shape']][variant]} " \
           f"{POSITION_PARAPHRASES[request['position']][variant]}"


def prompt_table(paraphrase: bool = False, variant: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """One prompt per colour x shape x position, with the attributes it names (paraphrased: variant k)."""
    prompts, attrs = [], []
    for color, shape, position in itertools.product(COLORS, SHAPES, POSITIONS):
        request = {"color": color, "shape": shape, "position": position}
        prompts.append(paraphrase_prompt(request, variant) if paraphrase else request_prompt(request))
        attrs.append(request)
    return prompts, attrs


def held_out(n: int, size: int, seed: int = HELD_OUT_SEED) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """`n` held-out images in [-1, 1] and their true attributes."""
    data = ShapesDataset(size=size, seed=seed)
    return data.get_batch(range(n))[0], [data.sample(i).attrs for i in range(n)]


def _accuracy(best: list[int], prompt_attrs: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy (%) of the chosen prompts against the truth, and all three right."""
    n = len(truth)
    report = {attr: 100.0 * sum(prompt_attrs[b][attr] == t[attr] for b, t in zip(best, truth)) / n
              for attr in ("color", "shape", "position")}
    report["all_three"] = 100.0 * sum(all(prompt_attrs[b][a] == t[a] for a in ("color", "shape", "position"))
                                      for b, t in zip(best, truth)) / n
    return report


def _mean_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in reports) / len(reports), 2) for k in reports[0]}


def _classify(embedder: Embedder, image: torch.Tensor, truth: list[dict[str, str]], paraphrase: bool) -> dict[str, float]:
    """Per-attribute accuracy (%) of matching image embeddings against the prompt table (paraphrased: the mean
    over the variants)."""
    reports = []
    for variant in range(PARAPHRASE_VARIANTS if paraphrase else 1):
        prompts, prompt_attrs = prompt_table(paraphrase, variant)
        best = (image @ embedder.embed_texts(prompts).T).argmax(dim=1).tolist()
        reports.append(_accuracy(best, prompt_attrs, truth))
    return _mean_reports(reports)


@torch.no_grad()
def text_only_reference(embedder: Embedder) -> dict[str, float]:
    """What the frozen text encoder alone understands: how often a paraphrased prompt's nearest caption-wording
    prompt (cosine of the frozen sentence encoder, or of the text tower when there is none) names the right
    colour / shape / position. A reference for the paraphrase zero-shot, not a strict bound."""
    encode, name = reference_text_encoder(embedder)
    captions, attrs = prompt_table(False)
    caption_emb = torch.nn.functional.normalize(encode(captions).float(), dim=-1)
    reports = []
    for variant in range(PARAPHRASE_VARIANTS):
        prompts, truth = prompt_table(True, variant)
        emb = torch.nn.functional.normalize(encode(prompts).float(), dim=-1)
        reports.append(_accuracy((emb @ caption_emb.T).argmax(dim=1).tolist(), attrs, truth))
    return {**_mean_reports(reports), "encoder": name}


def _retrieval(embedder: Embedder, image: torch.Tensor, truth: list[dict[str, str]], k: int) -> dict[str, float]:
    """For each example paraphrase: % of its top-k images that have every attribute it names."""
    sims = embedder.embed_texts(list(EXAMPLE_PARAPHRASES)) @ image.T
    report = {}
    for (prompt, wanted), row in zip(EXAMPLE_PARAPHRASES.items(), sims):
        top = row.topk(min(k, len(truth))).indices.tolist()
        report[prompt] = 100.0 * sum(all(truth[i][a] == v for a, v in wanted.items()) for i in top) / len(top)
    return report


@torch.no_grad()
def zero_shot_report(embedder: Embedder, n: int = 1000, size: int = 32, seed: int = HELD_OUT_SEED,
                     k: int = 20) -> dict[str, dict[str, float]]:
    """Zero-shot with caption wording and with paraphrases, and paraphrase top-k retrieval, on the same
    held-out images, rendered and embedded once (the pretrained ViT embeds ~5 images/s on a CPU)."""
    images, truth = held_out(n, size, seed)
    image = embedder.embed_images(images)
    return {"zero_shot": _classify(embedder, image, truth, paraphrase=False),
            "zero_shot_paraphrased": _classify(embedder, image, truth, paraphrase=True),
            "text_only_reference": text_only_reference(embedder),
            f"paraphrase_top{k}_precision": _retrieval(embedder, image, truth, k)}
