"""Every file of an exported model folder, tampered with in every way that applies (missing, truncated, a pickle in
its place, the wrong class, malformed or the wrong JSON), against the three ways in: `cclddg sample`, `cclddg
serve` and `CCLDDGPipeline.from_pretrained`. Each is refused in one line that names the file's component, before
anything loads: no traceback, no pickle loaded, no code the folder names imported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cclddg.cli import main
from cclddg.errors import UserError
from cclddg.model_folder import CCLDDGPipeline


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    _replace(path, data[: len(data) // 2])


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the folder is hard links to the fixture's files: never write through them
    path.write_bytes(data)


def _pickle(path: Path) -> None:
    """A torch.save pickle under the file's name."""
    path.unlink()
    torch.save({"weight": torch.zeros(2)}, path)


def _pickle_beside(path: Path) -> None:
    """The safetensors file gone, a pickle `.bin` in its place (diffusers would load that one)."""
    path.unlink()
    torch.save({"weight": torch.zeros(2)}, path.with_suffix(".bin"))


def _json(value) -> callable:
    return lambda path: _replace(path, json.dumps(value).encode())


def _rewrite(change) -> callable:
    """A tampering that changes a JSON file's object in place (`change(config)`)."""
    def rewrite(path: Path) -> None:
        config = json.loads(path.read_text())
        change(config)
        _replace(path, json.dumps(config).encode())
    return rewrite


def _edit(**changes) -> callable:
    return _rewrite(lambda config: config.update(changes))


def _drop(key: str) -> callable:
    return _rewrite(lambda config: config.pop(key))


def _link_outside(path: Path) -> None:
    outside = next(p for p in path.parents if p.name == "model").parent / f"outside-{path.name}"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


WEIGHT_TAMPERINGS = {"missing": Path.unlink, "truncated": _truncate, "a pickle": _pickle,
                     "a pickle beside it": _pickle_beside, "a link outside": _link_outside}
JSON_TAMPERINGS = {"missing": Path.unlink, "truncated": _truncate, "malformed": lambda p: _replace(p, b"{\"a\": "),
                   "a list": _json([1, 2]), "deeply nested": lambda p: _replace(p, b"[" * 100_000)}
CLASS_TAMPERINGS = {"another class": _edit(_class_name="Discriminator")}
INDEX_TAMPERINGS = {
    "no cond": _drop("cond"), "no img_size": _drop("img_size"), "another pipeline": _edit(_class_name="StableDiffusionPipeline"),
    "a custom component": _edit(extra=["os", "system"]), "the unet from another module": _edit(unet=["evil", "UNet"]),
    "no unet": _edit(unet=[None, None]), "an unknown cond": _edit(cond="audio"), "a string img_size": _edit(img_size="16"),
}


OPTIONAL = "embedding_stats.safetensors"  # needed only by the bank priors, which say so in one line when asked


def cases(folder: Path) -> list[tuple[str, str, callable]]:
    """(file relative to the folder, what was done, how) for every file of the folder."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        kinds = dict(WEIGHT_TAMPERINGS) if path.suffix == ".safetensors" else dict(JSON_TAMPERINGS)
        if path.suffix == ".json" and path.parent != folder and path.parent.parent == folder:
            kinds.update(CLASS_TAMPERINGS)  # a component's own config
        if rel == "model_index.json":
            kinds.update(INDEX_TAMPERINGS)
        if rel == OPTIONAL:
            kinds.pop("missing")
        out += [(rel, kind, how) for kind, how in kinds.items()]
    return out


def tampered(model: Path, root: Path, rel: str, how) -> Path:
    folder = root / "model"
    shutil.copytree(model, folder, copy_function=os.link)
    how(folder / rel)
    return folder


def component(rel: str) -> str:
    return rel.split("/")[0].split(".")[0]  # unet, vae, ..., model_index, embedding_stats


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["text", "labels"])
def test_every_tampering_of_every_file_is_one_line_at_every_entry_point(tiny_models, tmp_path, capsys, name):
    model = tiny_models[name]
    asks = ["--prompt", "red"] if name == "text" else ["--attrs", "color=red"]
    found = cases(model)
    assert len(found) >= (60 if name == "text" else 25)  # every file of the folder, several ways each
    for i, (rel, kind, how) in enumerate(found):
        folder = tampered(model, tmp_path / str(i), rel, how)
        what = f"{rel}: {kind}"
        with pytest.raises(UserError) as err:
            CCLDDGPipeline.from_pretrained(folder)
        assert component(rel) in str(err.value) or "model_index.json" in str(err.value), (what, str(err.value))
        assert main(["sample", "--checkpoint", str(folder), *asks, "--n", "1", "-o", str(tmp_path / f"{i}.png"),
                     "--no_progress"]) == 2, what
        line = one_line(capsys)
        assert line.startswith("cclddg sample: error: ") and component(rel) in line, (what, line)
        assert main(["serve", str(folder), "--port", "0"]) == 2, what  # refused before it serves
        line = one_line(capsys)
        assert line.startswith("cclddg serve: error: ") and component(rel) in line, (what, line)
        assert not (tmp_path / f"{i}.png").exists()
    print(f"{name}: {len(found)} tamperings x 3 entry points, every one a single line")


def test_the_intact_folder_passes_the_check(tiny_models):
    from cclddg.folder_check import check_model_folder

    for model in tiny_models.values():
        assert check_model_folder(model)["_class_name"] == "CCLDDGPipeline"
