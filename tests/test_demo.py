"""`cclddg demo` end to end on tiny settings: every stage writes its output, a rerun resumes (skips what
is done), and a folder holding something else is refused. (CI also runs the real `demo --quick`.)"""

from __future__ import annotations

import json

import pytest

from cclddg.cli import main
from cclddg.demo import Demo, DemoSettings
from cclddg.errors import UserError

TINY = DemoSettings(ae_steps=3, cloob_steps=3, cloob_size=64, data_size=64, gen_minutes=0.02, prior_steps=5, eval_n=4,
                    guidances=(2.0,), variety_n=8, variety_requests=2)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    Demo(out, quick=True, settings=TINY, progress=False).run()
    return out


def test_demo_writes_every_stage_and_a_report(demo_dir):
    for path in ("ae/report.json", "cloob/zero_shot.json", "cache/cache.json", "gen/done", "prompts.png",
                 "variety.png", "eval.json", "report.md", "report.json", "times.json", "model/model_index.json"):
        assert (demo_dir / path).is_file(), path
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["generator_steps"] >= 1
    assert set(report["eval"]) == {"2.0", "paraphrase 2.0", "cloob_score_real", "text_prior", "pct_text", "pseudo_text_xi",
                                   "variety"}
    assert report["eval"]["pct_text"] == 0.0 and report["eval"]["text_prior"] == "flow"  # language-free
    assert 0 <= report["eval"]["2.0"]["validity"] <= 1 and report["eval"]["paraphrase 2.0"]["prompts"] == "paraphrase"
    assert set(report["minutes"]) == {"ae", "cloob", "encode", "train", "sample", "sample_paraphrased",
                                      "sample_variety", "eval", "export"}
    variety = report["eval"]["variety"]
    assert set(variety["groups"]) == {"1", "2", "3"} and variety["z"]["n"] >= 2
    text = (demo_dir / "report.md").read_text()
    assert "| captions' wording | 2.0 |" in text and "| paraphrased | 2.0 |" in text and "dB" in text
    assert "![prompts](prompts.png)" in text and "![paraphrased prompts](paraphrases.png)" in text
    assert "text-only reference" in text
    assert "![variety](variety.png)" in text and "| attributes named |" in text


def test_demo_rerun_skips_finished_stages(demo_dir, capsys):
    times = json.loads((demo_dir / "times.json").read_text())
    Demo(demo_dir, quick=True, settings=TINY, progress=False).run()
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 9
    assert json.loads((demo_dir / "times.json").read_text()) == times


def test_demo_refuses_other_settings_and_foreign_folders(demo_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="other settings"):
        Demo(demo_dir, quick=False, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert "holds no demo" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_trains_the_autoencoder_and_the_clip_side_by_side(tmp_path):
    """With two threads the ae and cloob stages run at once, one process and one thread each: both finish, the
    group's wall time and each member's are recorded, and the rerun skips both."""
    demo = Demo(tmp_path / "demo", quick=True, settings=TINY, progress=False, threads=2)
    stages = {"ae": lambda: (demo.out / "ae" / "report.json").is_file(),
              "cloob": lambda: (demo.out / "cloob" / "zero_shot.json").is_file()}
    demo._side_by_side(stages)
    assert all(done() for done in stages.values())
    times = json.loads((demo.out / "times.json").read_text())
    assert set(times) == {"ae+cloob", "side_by_side"} and set(times["side_by_side"]) == {"ae", "cloob"}
    assert max(times["side_by_side"].values()) <= times["ae+cloob"]
    assert demo.total_seconds() == times["ae+cloob"]  # the members are not counted twice
    demo._side_by_side(stages)
    assert json.loads((demo.out / "times.json").read_text()) == times
