"""Our own CLOOB: the loss against an independent computation, the frozen sentence encoder against
HuggingFace's BERT, `cclddg train-cloob` end to end (learning, resume, bad input) and the embedder spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cclddg.cli import main
from cclddg.encoders import load_embedder, parse_encoder_spec
from cclddg.encoders.own_cloob import cloob_loss, info_loob
from cclddg.errors import UserError
from tiny import CLOOB, with_flags

TINY_CLOOB = with_flags(CLOOB, "--widths", "16,32", "--dim", "32", "--train_size", "512", "--batch_size", "64",
                        "--eval_size", "128", "--log_every", "25", "--save_every", "50", "--warmup", "5",
                        drop=("--n_batches",))


def numpy_cloob(x: np.ndarray, y: np.ndarray, inv_tau: float, beta: float) -> float:
    """The CLOOB loss written from the paper's matrix form (stored patterns as columns), in numpy."""
    def softmax(a, axis):
        e = np.exp(a - a.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def hopfield(state, stored):  # state, stored: (d, N) columns
        r = stored @ softmax(beta * stored.T @ state, axis=0)
        return r / np.linalg.norm(r, axis=0, keepdims=True)

    def loob(a, b):  # a, b: (d, N); positives on the diagonal
        k = inv_tau * a.T @ b
        n = k.shape[0]
        out = 0.0
        for i in range(n):
            neg = np.log(sum(np.exp(k[i, j]) for j in range(n) if j != i))
            out += neg - k[i, i]
        return out / n

    X, Y = x.T, y.T
    u_x, u_y = hopfield(X, X), hopfield(Y, Y)
    v_x, v_y = hopfield(Y, X), hopfield(X, Y)
    return (loob(u_x, v_x) + loob(u_y, v_y)) / 2


def test_cloob_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    ours = cloob_loss(x, y, inv_tau=4.0, scale_hopfield=3.0).item()
    assert ours == pytest.approx(numpy_cloob(x.numpy(), y.numpy(), 4.0, 3.0), rel=1e-9)


def test_cloob_loss_prefers_matched_pairs_and_info_loob_excludes_the_positive():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    matched = cloob_loss(x, x + 0.01 * torch.randn(16, 8, generator=g))
    shuffled = cloob_loss(x, x[torch.randperm(16, generator=g)])
    assert matched < shuffled - 1.0
    # Leave-one-out: the positive is never in the denominator, so the loss goes below zero when it dominates.
    assert info_loob(x, x, inv_tau=30.0) < 0


def test_sentence_encoder_matches_huggingface_bert():
    transformers = pytest.importorskip("transformers")
    from cclddg.encoders.sentence import load_sentence_encoder, model_dir

    texts = ["a red circle", "a crimson disc in the upper left", "blue background, small yellow square at the bottom"]
    ours = load_sentence_encoder().encode(texts)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    bert = transformers.AutoModel.from_pretrained(str(model_dir())).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    reference = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def cloob_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cloob") / "run"
    assert main(["train-cloob", "--out", str(out), "--n_batches", "150", *TINY_CLOOB]) == 0
    return out


def test_train_cloob_learns_and_writes_its_run_folder(cloob_run):
    losses = [json.loads(line)["loss"] for line in (cloob_run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0  # chance is log(63) = 4.14
    report = json.loads((cloob_run / "zero_shot.json").read_text())
    assert report["step"] == 150
    # 8 colours: chance is 12.5%; 150 tiny steps already read colour better than chance
    assert report["zero_shot"]["color"] > 18
    assert (cloob_run / "checkpoints" / "latest").read_text() == "step_0000150"


def test_own_cloob_is_an_embedder(cloob_run):
    emb = load_embedder(f"cloob-tiny:{cloob_run}")
    assert emb.dim == 32
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    a = emb.embed_images(images)
    assert a.shape == (5, 32) and not a.requires_grad
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(emb.embed_images(images[:2]), a[:2], atol=1e-5, rtol=1e-5)
    # the towers resize: a 32 px version of the same images lands close to the 16 px one
    t = emb.embed_texts(["a red circle", "a blue square in the top left"])
    assert t.shape == (2, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert emb.embed_texts(["a red circle"]).sub(t[0]).abs().max() < 1e-5


def test_train_cloob_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    def weights(run):
        name = (run / "checkpoints" / "latest").read_text()
        return load_file(run / "checkpoints" / name / "cloob" / "diffusion_pytorch_model.safetensors")

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train-cloob", "--out", str(straight), "--n_batches", "12", *TINY_CLOOB, "--eval_size", "8"]) == 0
    assert main(["train-cloob", "--out", str(split), "--n_batches", "7", *TINY_CLOOB, "--eval_size", "8"]) == 0
    assert main(["train-cloob", "--out", str(split), "--resume", "--n_batches", "12", "--no_progress"]) == 0
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.parametrize("argv, expected", [
    (["--text_tower", "gpt"], "--text_tower 'gpt' is not valid"),
    (["--batch_size", "1"], "--batch_size must be in [2"),
    (["--widths", "8,16,32,64,128"], "not divisible"),
])
def test_train_cloob_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    code = main(["train-cloob", "--out", str(tmp_path / "r"), *TINY_CLOOB, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("spec, expected", [
    ("cloob-tiny", "not valid"), ("clip:foo", "not valid"), ("open_clip:weights.pt", "open_clip:MODEL:PATH"),
])
def test_bad_encoder_specs(spec, expected):
    with pytest.raises(UserError, match=expected):
        parse_encoder_spec(spec)


def test_missing_and_foreign_encoder_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_embedder(f"cloob-tiny:{tmp_path / 'nothing'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="holds no CLOOB model"):
        load_embedder(f"cloob-tiny:{tmp_path / 'junk'}")


def test_bpe_text_tower_trains_from_scratch(tmp_path):
    out = tmp_path / "bpe"
    assert main(["train-cloob", "--out", str(out), "--text_tower", "bpe", "--n_batches", "75", *TINY_CLOOB,
                 "--eval_size", "16"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    emb = load_embedder(f"cloob-tiny:{out}")
    assert emb.max_text_tokens == 32  # its context: longer prompts are refused, not silently cut
    t = emb.embed_texts(["a red circle", "a red circle", "a blue square"])
    torch.testing.assert_close(t[0], t[1])
    assert (t[0] - t[2]).abs().max() > 1e-4
    with pytest.raises(UserError, match="tokens long"):
        emb.check_prompt("red " * 40)


def test_locked_text_head_keeps_the_sentence_encoders_space(tmp_path):
    """LiT: no trained text head, so a prompt's embedding is the frozen sentence encoder's (384-d) and only the
    image tower learns; the text-only reference is reported beside the paraphrase zero-shot."""
    out = tmp_path / "locked"
    argv = ["train-cloob", "--out", str(out), *[a for a in TINY_CLOOB if a not in ("--dim", "32")],
            "--text_head", "locked", "--n_batches", "10", "--eval_size", "32"]
    assert main(argv) == 0
    embedder = load_embedder(f"cloob-tiny:{out}")
    assert embedder.dim == 384
    prompts = ["a red circle in the top left", "a crimson disc in the upper left"]
    torch.testing.assert_close(embedder.embed_texts(prompts), embedder.sentence.encode(prompts))
    report = json.loads((out / "zero_shot.json").read_text())
    reference = report["text_only_reference"]
    assert reference["encoder"] == "frozen sentence encoder"
    # the frozen MiniLM reads most paraphrased shapes right, but colours and positions far less well
    assert reference["shape"] > 60 and reference["color"] < reference["shape"]
    assert set(report["zero_shot_paraphrased"]) == {"color", "shape", "position", "all_three"}


@pytest.mark.parametrize("extra, expected", [
    (["--text_head", "fixed"], "--text_head 'fixed' is not valid"),
    (["--text_head", "locked", "--text_tower", "bpe"], "needs --text_tower minilm"),
    (["--text_head", "locked", "--dim", "32"], "--dim 384"),
])
def test_text_head_bad_input_is_one_line(tmp_path, capsys, extra, expected):
    assert main(["train-cloob", "--out", str(tmp_path / "run"), *TINY_CLOOB[:-1], *extra, "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_paraphrases_use_no_caption_words():
    """The paraphrase set: several wordings per value, none of them a caption's colour, shape or position word."""
    from cclddg.data.shapes import ATTRIBUTE_VALUES, ShapesDataset
    from cclddg.evaluation.zero_shot import (
        COLOR_PARAPHRASES,
        PARAPHRASE_VARIANTS,
        POSITION_PARAPHRASES,
        SHAPE_PARAPHRASES,
        prompt_table,
    )

    for table in (COLOR_PARAPHRASES, SHAPE_PARAPHRASES, POSITION_PARAPHRASES):
        assert all(len(set(v)) == PARAPHRASE_VARIANTS for v in table.values())
    vocabulary = {w for attr in ("color", "shape") for w in ATTRIBUTE_VALUES[attr]}
    for variant in range(PARAPHRASE_VARIANTS):
        prompts, _ = prompt_table(True, variant)
        assert len(set(prompts)) == 216
        for prompt in prompts:
            assert not vocabulary & set(prompt.replace("-", " ").split()), prompt
    captions = {ShapesDataset(size=16, seed=0).sample(i).caption for i in range(2000)}
    phrases = [p for values in POSITION_PARAPHRASES.values() for p in values]
    assert not [p for p in phrases if any(p in c for c in captions)]
