"""How well an embedder reads real captioned data: does each image find its own caption?

For data without the shapes' attributes this is the zero-shot test: every held-out image is compared with
every distinct held-out caption; a hit is the image's own caption text ranked first (top 1) or within
the first five (top 5). Chance is 1 / (distinct captions).
"""

from __future__ import annotations

import torch

from cclddg.encoders.base import reference_text_encoder
from cclddg.errors import UserError


@torch.no_grad()
def retrieval_report(embedder, images: torch.Tensor, captions: list[str], batch_size: int = 256) -> dict:
    """Image -> caption retrieval over the distinct captions, and the mean cosine of matched pairs."""
    if len(images) != len(captions) or not captions:
        raise UserError(f"retrieval needs one caption per image, got {len(images)} images, {len(captions)} captions")
    distinct = sorted(set(captions))
    position = {c: i for i, c in enumerate(distinct)}
    own = torch.tensor([position[c] for c in captions])
    texts = torch.cat([embedder.embed_texts(distinct[s:s + batch_size]) for s in range(0, len(distinct), batch_size)])
    feats = torch.cat([embedder.embed_images(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
    sims = feats.float().cpu() @ texts.float().cpu().T
    rank = (sims > sims.gather(1, own[:, None])).sum(1)  # captions scored above the image's own
    return {"n": len(captions), "distinct_captions": len(distinct),
            "top1": round(float((rank < 1).float().mean()) * 100, 2),
            "top5": round(float((rank < 5).float().mean()) * 100, 2),
            "chance_top1": round(100 / len(distinct), 3),
            "cloob_score": round(float(sims.gather(1, own[:, None]).mean()), 4)}


@torch.no_grad()
def paraphrase_retrieval(embedder, images: torch.Tensor, captions: list[str], paraphrases: dict[str, str]) -> dict:
    """Text -> image retrieval among the held-out images, for the held-out captions that have a paraphrase: does
    the name, and does its paraphrase, rank its own image first (top 1) or in the first five? Beside it, the
    text-only reference: how often the frozen sentence encoder (or the text tower) puts the paraphrase nearest to
    its own name among all the held-out names."""
    named = [(i, c) for i, c in enumerate(captions) if c in paraphrases]
    if not named:
        return {"n": 0}
    feats = torch.cat([embedder.embed_images(images[s:s + 256]) for s in range(0, len(images), 256)]).float().cpu()
    own = torch.tensor([i for i, _ in named])

    def ranks(texts: list[str]) -> dict:
        sims = embedder.embed_texts(texts).float().cpu() @ feats.T  # (queries, images)
        rank = (sims > sims.gather(1, own[:, None])).sum(1)
        return {"top1": round(float((rank < 1).float().mean()) * 100, 2),
                "top5": round(float((rank < 5).float().mean()) * 100, 2)}

    encode, _ = reference_text_encoder(embedder)
    distinct = sorted(set(captions))
    names = torch.nn.functional.normalize(encode(distinct).float().cpu(), dim=-1)
    queries = torch.nn.functional.normalize(encode([paraphrases[c] for _, c in named]).float().cpu(), dim=-1)
    nearest = (queries @ names.T).argmax(1).tolist()
    reference = 100.0 * sum(distinct[j] == c for j, (_, c) in zip(nearest, named)) / len(named)
    return {"n": len(named), "images": len(images), "names": ranks([c for _, c in named]),
            "paraphrases": ranks([paraphrases[c] for _, c in named]),
            "text_only_reference_top1": round(reference, 2)}
