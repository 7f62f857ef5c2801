"""Does a shapes model *generate*, or look up? Variety of what a request leaves open, variety from z.

- **What a request leaves open.** Requests name 1, 2 or 3 of colour / shape / position; N samples each are read
  back by the analyzer. Per attribute the request does not name (size and background always), the readings are
  compared with the data's distribution for the same request, computed exactly from the data contract
  (data/shapes.py: attributes independent and uniform, the background another colour, no held-out pair):
  the entropy relative to the data's, the total-variation distance of the group's pooled readings to the
  data's, and the number of distinct combinations of the open attributes against the number N draws from the
  data show on average. The same requests answered with real images (N rendered per request, read by the same
  analyzer) are the finite-sample reference: no model can beat them at this N.
- **Variety from z.** One fixed condition (the image embedding, or the full label, of a real image), N samples:
  their mean pairwise pixel distance with all the noise drawn afresh, and with only z drawn afresh (the same
  x_T and step noise), beside the distance between real images that share every attribute of the prompt image
  (they differ by the data's size and position jitter). A generator that ignores z shows ~0 in the second.

The named attributes' adherence is reported beside the variety, so the trade-off is one table.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cclddg.data.images import image_to_tensor
from cclddg.data.shapes import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Holdout,
    ShapesDataset,
    is_held_out,
    render,
)
from cclddg.evaluation.shapes_eval import Analysis, analyze, summarize

NAMEABLE = ("color", "shape", "position")  # what variety requests name (1, 2 or 3 of them)
Request = dict[str, str]
Conditions = Callable[[Sequence[Request]], "Tensor | None"]  # one condition per request row (None: unconditional)
Sampler = Callable[[Tensor | None, int, int], Tensor]  # (conditions, count, seed) -> images in [-1, 1]


# ---- the data's distribution, from the contract ------------------------------------------------------------
def data_combinations(holdout: Holdout = frozenset()) -> list[tuple[Request, float]]:
    """Every (colour, shape, size, position, background) the data draws, with its probability."""
    out = []
    for color in COLORS:
        shapes = [s for s in SHAPES if (color, s) not in holdout]
        for shape, size, position, background in itertools.product(shapes, SIZES, POSITIONS, COLORS):
            if background != color:
                p = 1 / (len(COLORS) * len(shapes) * len(SIZES) * len(POSITIONS) * (len(COLORS) - 1))
                out.append(({"color": color, "shape": shape, "size": size, "position": position,
                             "background": background}, p))
    return out


def conditional(request: Request, holdout: Holdout = frozenset()) -> list[tuple[Request, float]]:
    """The data's images that fit a request, with their probabilities (normalised). A request for a held-out pair
    has none in the training data: it gets the contract's distribution without the holdout (what such an image
    would be)."""
    fits = [(a, p) for a, p in data_combinations(holdout) if all(a[k] == v for k, v in request.items())]
    if not fits and holdout:
        return conditional(request)
    total = sum(p for _, p in fits)
    return [(a, p / total) for a, p in fits]


def marginal(combos: list[tuple[Request, float]], attrs: Sequence[str]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for a, p in combos:
        key = tuple(a[k] for k in attrs)
        out[key] = out.get(key, 0.0) + p
    return out


def entropy(probs: Sequence[float]) -> float:
    """In bits."""
    return float(-sum(p * math.log2(p) for p in probs if p > 0))


def empirical(readings: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
    counts = Counter(readings)
    return {k: c / len(readings) for k, c in counts.items()} if readings else {}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def expected_distinct(q: dict, n: int) -> float:
    """The expected number of distinct values among n independent draws from q."""
    return float(sum(1 - (1 - p) ** n for p in q.values()))


# ---- requests --------------------------------------------------------------------------------------------
def variety_requests(named: int, count: int, seed: int, holdout: Holdout = frozenset()) -> list[Request]:
    """`count` requests naming `named` of colour / shape / position (the subsets in turn, so each attribute is left
    open about equally often; their values uniform), none of them a held-out pair."""
    rng = np.random.default_rng([seed, named])
    subsets = list(itertools.combinations(NAMEABLE, named))
    out: list[Request] = []
    while len(out) < count:
        attrs = subsets[len(out) % len(subsets)]
        request = {a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in attrs}
        if not is_held_out(request, holdout):
            out.append(request)
    return out


def real_answers(request: Request, n: int, size: int, seed: int, holdout: Holdout = frozenset()) -> list[Analysis]:
    """N real images drawn from the data's distribution for the request (with the data's jitter), analysed."""
    combos = conditional(request, holdout)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(combos), size=n, p=np.array([p for _, p in combos]))
    return [analyze(render(size, combos[i][0], rng)) for i in picks]


# ---- what a request leaves open -------------------------------------------------------------------------
def open_attributes(request: Request) -> tuple[str, ...]:
    return tuple(a for a in ATTRIBUTES if a not in request)


def request_variety(request: Request, analyses: Sequence[Analysis], holdout: Holdout = frozenset()) -> dict:
    """One request's readings against the data's: per open attribute the entropy ratio and the distribution;
    the distinct combinations of all the open attributes."""
    combos = conditional(request, holdout)
    valid = [a for a in analyses if a.valid]
    out: dict = {"attributes": {}}
    for attr in open_attributes(request):
        q = marginal(combos, (attr,))
        p = empirical([(getattr(a, attr),) for a in valid])
        out["attributes"][attr] = {"entropy_ratio": entropy(p.values()) / entropy(q.values()), "p": p, "q": q}
    open_ = open_attributes(request)
    q_joint = marginal(combos, open_)
    out["distinct"] = len({tuple(getattr(a, k) for k in open_) for a in valid})
    out["expected_distinct"] = expected_distinct(q_joint, len(analyses))
    out["possible"] = len(q_joint)
    return out


def _mean_distribution(dists: Sequence[dict]) -> dict:
    out: dict = {}
    for d in dists:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v / len(dists)
    return out


def group_summary(requests: Sequence[Request], per_request: Sequence[dict]) -> dict:
    """Means over one group's requests; the total variation of the pooled readings (the mean of the requests'
    distributions) against the pooled data's, and the mean per request."""
    attrs: dict[str, dict] = {}
    for attr in ATTRIBUTES:
        rows = [r["attributes"][attr] for r in per_request if attr in r["attributes"]]
        if not rows:
            continue
        read = [r for r in rows if r["p"]]  # requests with at least one valid sample
        pooled_p, pooled_q = _mean_distribution([r["p"] for r in read]), _mean_distribution([r["q"] for r in read])
        attrs[attr] = {"entropy_ratio": round(float(np.mean([r["entropy_ratio"] for r in rows])), 4),
                       "tv": round(total_variation(pooled_p, pooled_q), 4) if read else 1.0,
                       "tv_per_request": round(float(np.mean([total_variation(r["p"], r["q"]) if r["p"] else 1.0
                                                              for r in rows])), 4)}
    return {"open": attrs,
            "distinct": round(float(np.mean([r["distinct"] for r in per_request])), 2),
            "expected_distinct": round(float(np.mean([r["expected_distinct"] for r in per_request])), 2),
            "possible": round(float(np.mean([r["possible"] for r in per_request])), 2)}


def adherence(requests: Sequence[Request], analyses: Sequence[Sequence[Analysis]]) -> dict:
    """Accuracy on the named attributes and validity, over every sample of every request."""
    flat = [a for group in analyses for a in group]
    wanted = [r for r, group in zip(requests, analyses) for _ in group]
    report = summarize(flat, wanted)
    return {k: (None if v is None else round(float(v), 4)) for k, v in report.items()
            if k == "validity" or (k.endswith("_acc") and v is not None)}


def variety_report(sample: Sampler, conditions: Conditions, img_size: int, holdout: Holdout = frozenset(),
                   requests_per_group: int = 8, n: int = 32, seed: int = 0, real: bool = True,
                   progress: Callable[[Sequence], Sequence] = lambda x: x) -> dict:
    """The variety table: for requests naming 1, 2 and 3 attributes, the samples' adherence and variety beside
    the real images' (`real`: the finite-sample reference). `conditions` makes one condition per request row;
    `sample(cond, count, seed)` makes the images."""
    report: dict = {"n": n, "requests_per_group": requests_per_group, "groups": {}}
    for named in progress((1, 2, 3)):
        requests = variety_requests(named, requests_per_group, seed, holdout)
        generated, references = [], []
        for i, request in enumerate(requests):
            cond = conditions([request] * n)
            images = sample(cond, n, seed * 1000 + named * 100 + i)
            generated.append([analyze(x) for x in images])
            if real:
                references.append(real_answers(request, n, img_size, seed * 1000 + named * 100 + i, holdout))
        group = {"requests": [dict(r) for r in requests], "adherence": adherence(requests, generated),
                 **group_summary(requests, [request_variety(r, a, holdout) for r, a in zip(requests, generated)])}
        if real:
            group["real"] = {"adherence": adherence(requests, references),
                             **group_summary(requests, [request_variety(r, a, holdout)
                                                        for r, a in zip(requests, references)])}
        report["groups"][str(named)] = group
    return report


# ---- variety from z --------------------------------------------------------------------------------------
def mean_pairwise_distance(images: Tensor) -> float:
    """Mean RMS pixel difference (in [0, 1] units) over all pairs of (B, 3, H, W) images in [-1, 1]."""
    x = ((images.float().clamp(-1, 1) + 1) / 2).flatten(1)
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])
    b = len(x)
    return float(d.sum() / (b * (b - 1))) if b > 1 else 0.0


def z_variety(sample_all: Callable[[Tensor | None, int, int], Tensor],
              sample_z_only: Callable[[Tensor | None, int, int], Tensor] | None,
              image_condition: Callable[[Tensor, Request], "Tensor | None"], img_size: int, prompts: int = 8,
              n: int = 16, seed: int = 0) -> dict:
    """For `prompts` real images: n samples of the image's condition with all noise drawn afresh, and with only z
    (`sample_z_only`; None: the model has no z), beside n real images with the same five attributes."""
    data = ShapesDataset(size=img_size, seed=seed + 7_000_003)
    rows = {"all_noise": [], "z_only": [], "real": []}
    for i in range(prompts):
        sample = data.sample(i)
        cond = image_condition(image_to_tensor(sample.image), sample.attrs)
        cond = None if cond is None else cond.expand(n, -1)
        rows["all_noise"].append(mean_pairwise_distance(sample_all(cond, n, seed + i)))
        if sample_z_only is not None:
            rows["z_only"].append(mean_pairwise_distance(sample_z_only(cond, n, seed + i)))
        rng = np.random.default_rng([seed, i])
        real = torch.stack([image_to_tensor(render(img_size, sample.attrs, rng)) for _ in range(n)])
        rows["real"].append(mean_pairwise_distance(real))
    out = {k: round(float(np.mean(v)), 4) for k, v in rows.items() if v}
    out["z_only_vs_real"] = round(out["z_only"] / out["real"], 3) if "z_only" in out else 0.0
    out["all_noise_vs_real"] = round(out["all_noise"] / out["real"], 3)
    out.update(prompts=prompts, n=n)
    return out


# ---- the table ---------------------------------------------------------------------------------------------
ATTRIBUTE_NAMES = {"color": "colour", "shape": "shape", "size": "size", "position": "position",
                   "background": "background"}


def variety_table(report: dict) -> list[str]:
    """The variety report as a markdown table: per group of requests, the samples' and the real images' adherence
    on the named attributes, entropy ratio / pooled total variation per open attribute, distinct combinations."""
    head = "| attributes named | images | named right | validity | " + " | ".join(
        f"{ATTRIBUTE_NAMES[a]}: H / TV" for a in ATTRIBUTES) + " | distinct combinations (data: expected) |"
    lines = [head, "|" + "---|" * (6 + len(ATTRIBUTES) - 1)]
    for named, group in report["groups"].items():
        for label, part in (("samples", group), ("real", group.get("real"))):
            if part is None:
                continue
            adherence = part["adherence"]
            accs = [v for k, v in adherence.items() if k.endswith("_acc") and k != "mean_acc"]
            cells = []
            for attr in ATTRIBUTES:
                row = part["open"].get(attr)
                cells.append("named" if row is None else f"{100 * row['entropy_ratio']:.0f}% / {row['tv']:.2f}")
            lines.append(f"| {named} | {label} | {100 * float(np.mean(accs)):.1f}% | {100 * adherence['validity']:.1f}% | "
                         + " | ".join(cells) + f" | {part['distinct']:.1f} ({part['expected_distinct']:.1f}) |")
    return lines


def z_line(z: dict) -> str:
    """One sentence for the variety from z."""
    if "z_only" not in z:
        return (f"Variety from the noise for one fixed condition: {z['all_noise']:.3f} RMS pixel distance between "
                f"samples ({z['all_noise_vs_real']:.2f}x the real images with the same attributes, {z['real']:.3f}); "
                "this model has no z.")
    ignored = " The generator ignores z." if z["z_only_vs_real"] < 0.1 else ""
    return (f"Variety for one fixed condition ({z['prompts']} real images' conditions, {z['n']} samples each), RMS "
            f"pixel distance between samples: all noise {z['all_noise']:.3f} ({z['all_noise_vs_real']:.2f}x the real "
            f"images with the same attributes, {z['real']:.3f}), z alone {z['z_only']:.3f} "
            f"({z['z_only_vs_real']:.2f}x).{ignored}")
