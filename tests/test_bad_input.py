"""Every subcommand, every numeric option, every path option, with bad values: a working run or one line.

Not a list of hand-picked cases: the options are read from the parser itself. A numeric option is one whose type
turns "1" into a number (or a list of numbers); a path option is one whose metavar names a kind of path
(cli.PATH_METAVARS). Each gets the values below on top of a small working command line of its subcommand. The
outcome must be a run that exits 0, or a non-zero exit with exactly one line on stderr: never a traceback, never a
user's file replaced.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from cclddg.cli import PATH_METAVARS, build_parser, main
from tiny import AE, CLOOB, TRAIN, with_flags

NUMBERS = ("0", "-1", "nan", "inf", "1e30", "abc")
PATH_CASES = ("missing", "file", "folder", "unwritable")
UNWRITABLE = "/proc/cclddg-no-such-place/x"  # refused even to root

TINY_CLOOB = with_flags(CLOOB, "--eval_size", "8", "--n_batches", "2", "--warmup", "1", "--text_tower", "bpe")
TINY_AE = with_flags(AE, "--train_size", "16", "--eval_size", "4", "--batch_size", "4", "--n_batches", "2",
                     drop=("--latent_channels",))


@pytest.fixture(scope="module")
def label_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_input") / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "2"]) == 0
    return out


def fresh_text_run(text_run: Path, new: Path) -> Path:
    """A copy of the tiny embedding run without its learned prior, for `train-prior` to train one into."""
    shutil.copytree(text_run, new, ignore=shutil.ignore_patterns("prior"))
    return new


def base_command(command: str, run: Path, new: Path, text_run: Path) -> list[str]:
    """A small command line of `command` that works; `new` is a path nothing exists at."""
    if command == "train-prior":
        return ["train-prior", str(fresh_text_run(text_run, new)), "--n_batches", "2", "--batch_size", "8",
                "--eval_size", "2", "--width", "16", "--no_progress"]
    return {
        "train": ["train", "--out", str(new), *TRAIN, "--n_batches", "1"],
        "train-cloob": ["train-cloob", "--out", str(new), *TINY_CLOOB],
        "train-ae": ["train-ae", "--out", str(new), *TINY_AE],
        "encode": ["encode", "--data", "shapes:16", "--n", "8", "--autoencoder", "pixels", "--out", str(new),
                   "--no_progress"],
        "sample": ["sample", "--checkpoint", str(run), "--attrs", "color=red", "--n", "2", "-o", f"{new}.png",
                   "--no_progress"],
        "eval": ["eval", "--checkpoint", str(run), "--n", "4"],
        "demo": ["demo", "--out", str(new), "--no_progress"],
        "embedding-stats": ["embedding-stats", str(run), "--no_progress"],
        "plot": ["plot", str(run), "-o", f"{new}.png"],
        "export": ["export", str(run), str(new)],
        "serve": ["serve", str(run), "--port", "0"],
    }[command]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = build_parser()._subparsers._group_actions[0]  # the subcommands
    return dict(actions.choices)


def option_name(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.dest)


def is_numeric(action: argparse.Action) -> bool:
    if action.type is None or action.choices:
        return False
    for text in ("1", "0", "2", "0.5"):  # one of them is in any range
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        values = value if isinstance(value, tuple) else (value,)
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return False


def numeric_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option_name(a) for a in parser._actions if a.option_strings and is_numeric(a)]


def path_options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(option, metavar); a positional path is given as its own name, e.g. "RUN"."""
    return [(option_name(a) if a.option_strings else "", a.metavar) for a in parser._actions
            if a.metavar in PATH_METAVARS]


def outcome(argv: list[str], capsys) -> str:
    """"ran", "one line", or what went wrong."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # only argparse may exit; main() returns its code
        code = exc.code
    except BaseException as exc:  # a traceback for the user
        return f"traceback {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if code == 0:
        return "ran"
    if len(err) == 1 and err[0].startswith("cclddg"):
        return "one line"
    return f"exit {code} with {len(err)} lines on stderr: {' | '.join(err)[:300]}"


def path_value(case: str, metavar: str, tmp: Path) -> str:
    """A path of the kind `case` for an option of kind `metavar`."""
    prefix = {"ENCODER": "cloob-tiny:", "AUTOENCODER": "own:"}.get(metavar, "")
    suffix = {"OUT_FILE": ".png", "FILE": ".png"}.get(metavar, "")
    path = {"missing": tmp / "missing" / f"nothing{suffix}", "file": tmp / "a_file.txt",
            "folder": tmp / "a_folder", "unwritable": Path(UNWRITABLE + suffix)}[case]
    return prefix + str(path)


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's settings and folder are checked for real when it is made; its hour of training is not run.
    `serve` loads its model and opens its port for real, then returns instead of serving until Ctrl-C."""
    from cclddg import serve
    from cclddg.demo import Demo

    monkeypatch.setattr(Demo, "run", lambda self: {})
    monkeypatch.setattr(serve.Generator, "work", lambda self: None)


@pytest.mark.parametrize("command", list(subcommands()))
def test_every_numeric_option_takes_bad_values_in_one_line(command, label_run, tiny_runs, tmp_path, capsys,
                                                           no_demo_work):
    parser = subcommands()[command]
    failures, tried = [], 0
    for option in numeric_options(parser):
        for value in NUMBERS:
            new = tmp_path / f"case{tried}"
            result = outcome([*base_command(command, label_run, new, tiny_runs / "text"), option, value], capsys)
            tried += 1
            if result not in ("ran", "one line"):
                failures.append(f"{command} {option} {value}: {result}")
    assert tried > 0
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("command", list(subcommands()))
def test_every_path_option_takes_bad_paths_in_one_line(command, label_run, tiny_runs, tmp_path, capsys, no_demo_work):
    parser = subcommands()[command]
    user_file, user_folder = tmp_path / "a_file.txt", tmp_path / "a_folder"
    user_file.write_text("the user's notes\n")
    user_folder.mkdir()
    (user_folder / "keep.txt").write_text("the user's other notes\n")
    failures = []
    for i, (option, metavar) in enumerate(path_options(parser)):
        for case in PATH_CASES:
            argv = base_command(command, label_run, tmp_path / f"case{i}-{case}", tiny_runs / "text")
            value = path_value(case, metavar, tmp_path)
            if option:
                argv = [*argv, option, value]
            else:  # a positional RUN (the first argument) or OUT_FOLDER (export's second)
                given = argv[1] if metavar == "RUN" else str(tmp_path / f"case{i}-{case}")
                argv = [value if a == given else a for a in argv]
            result = outcome(argv, capsys)
            if result not in ("ran", "one line"):
                failures.append(f"{command} {option or metavar} {case}: {result}")
            if user_file.read_text() != "the user's notes\n" or not (user_folder / "keep.txt").is_file():
                failures.append(f"{command} {option or metavar} {case}: replaced or removed the user's files")
                user_file.write_text("the user's notes\n")
                (user_folder / "keep.txt").write_text("the user's other notes\n")
    assert not failures, "\n".join(failures)


def test_every_number_flag_is_checked():
    """No numeric flag parses with a bare int/float (which takes nan, inf and any range)."""
    bare = [f"{name} {option_name(a)}" for name, p in subcommands().items() for a in p._actions
            if a.type in (int, float)]
    assert not bare, bare


@pytest.mark.parametrize("outputs", [["-o", "{d}/x.png", "--singles", "{d}/x.png"],
                                     ["-o", "{d}/x.png", "--singles", "{d}/x.png/singles"]])
def test_sample_outputs_that_would_overwrite_each_other_stop_before_sampling(label_run, tmp_path, capsys, outputs):
    args = [a.format(d=tmp_path) for a in outputs]
    assert main(["sample", "--checkpoint", str(label_run), "--n", "2", *args, "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("same path" in err[0] or "lies inside the file" in err[0]), err
    assert not list(tmp_path.iterdir())  # nothing sampled, nothing made


def test_a_checkpoint_without_its_weights_is_our_one_line_only(label_run, tmp_path, capsys):
    """diffusers logs its own lines for a missing weights file; the check comes first."""
    run = tmp_path / "run"
    shutil.copytree(label_run, run)
    for weights in run.glob("checkpoints/*/generator*/diffusion_pytorch_model.safetensors"):
        weights.unlink()
    assert main(["sample", "--checkpoint", str(run), "--n", "1", "-o", str(tmp_path / "x.png"), "--no_progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "no diffusion_pytorch_model.safetensors" in err[0] and not captured.out, captured


def test_zero_steps_are_refused_before_a_run_folder_is_made(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--n_batches", "0", "--no_progress"]) == 2
    assert "--n_batches must be >= 1" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_encoder_of_another_width_is_one_line_in_sample_and_eval(tiny_runs, tmp_path, capsys):
    """The generator's forward refuses a wrong width with a ValueError (a caller's mistake); a user's --encoder of
    another width is named before sampling, in one line."""
    other = tmp_path / "cloob8"
    assert main(["train-cloob", "--out", str(other), *with_flags(CLOOB, "--dim", "8")]) == 0
    run = str(tiny_runs / "text")
    for argv in (["sample", "--checkpoint", run, "--prompt", "a red circle", "-o", str(tmp_path / "x.png"),
                  "--no_progress"],
                 ["eval", "--checkpoint", run, "--n", "4"]):
        capsys.readouterr()
        assert main([*argv, "--encoder", f"cloob-tiny:{other}"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "gives 8-d embeddings but the generator expects 16-d" in err[0], err
        assert not (tmp_path / "x.png").exists()
