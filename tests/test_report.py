"""The report: partial runs, a full pipeline directory of tiny real runs, the page in headless Chromium, the CLI."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from effcifar.data import make_synthetic
from effcifar.errors import ConfigError
from effcifar.hpo.study import HpoConfig, run_study, write_best
from effcifar.nas.search import SearchConfig, run_search
from effcifar.nas.select import SelectConfig, SelectionResult, select_from_search
from effcifar.nas.supernet import SupernetConfig
from effcifar.nas.retrain import retrain_top
from effcifar.nas.trainer import train_supernet
from effcifar.report import (
    FRONT_TITLE, front_sentence, load_study, make_report, param_importances, pareto_front, write_report,
)
from effcifar.train import TrainConfig, train

from conftest import NARROW, TINY_BASE, TINY_SPACE

RESULTS = [{"name": "baseline", "test_acc": 0.91, "train_time": 12.5, "params": 123456, "flops": 2_000_000},
           {"name": "hpo", "test_acc": 0.93, "train_time": 10.0, "params": 98765, "flops": 1_500_000},
           {"name": "nas", "test_acc": 0.94, "train_time": 11.0, "params": 87654, "flops": 1_200_000}]
STAGE_IMAGES = {"baseline": ["baseline_curves.png"],
                "hpo": ["hpo_history.png", "hpo_pareto.png", "hpo_importance.png", "hpo_parallel.png"],
                "hpo_best": ["hpo_best_curves.png"],
                "supernet": ["supernet_panel.png"], "search": ["search_progress.png", "search_flops.png"],
                "select": ["select_selection.png"], "retrain": ["retrain_curves.png"],
                "nas_eval": ["nas_eval_ranking.png"]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A pipeline directory of tiny real runs (1 epoch each, synthetic data), a ranking.json and results.json."""
    root = tmp_path_factory.mktemp("report") / "pipeline"
    data = make_synthetic(n_train=300, n_test=200)
    tiny = {**TINY_BASE, "epochs": 1, "peak_epoch": 0.5, "threads": 1, "precision": "fp32"}
    train(TrainConfig(**tiny), root / "baseline", data=data)
    files = tmp_path_factory.mktemp("hpo-files")
    (files / "base.json").write_text(json.dumps(tiny))
    (files / "space.json").write_text(json.dumps(TINY_SPACE))
    run_study(HpoConfig(space=str(files / "space.json"), base=str(files / "base.json"), trials=3, sampler_seed=0,
                        pruner="none"), root / "hpo")
    write_best(root / "hpo")
    (root / "hpo" / "search_space.json").write_text(json.dumps(TINY_SPACE))  # as the pipeline keeps it
    supernet = SupernetConfig.of(dataset="synthetic", subset=300, holdout=100, batch_size=50, bn_batches=1,
                                 panel_random=1, eval_batch_size=100, precision="fp32", threads=1, epochs=2,
                                 shrink_at="1", shrink_samples=1, **NARROW)
    train_supernet(supernet, root / "supernet", warn=lambda message: None)
    run_search(SearchConfig(population=4, parents=2, mutations=1, crossovers=1, trials=8, precision="fp32",
                            threads=1, export=2), root / "supernet", root / "search")
    select_from_search(SelectConfig(pool=1), root / "search", root / "select",
                       TrainConfig(**{**tiny, "subset": 300, "holdout": 100, **NARROW}))
    for copy in ("hpo_best", "retrain/answer"):
        shutil.copytree(root / "baseline", root / copy)
    (root / "nas_eval").mkdir()
    (root / "nas_eval" / "ranking.json").write_text(json.dumps(
        {"supernet_acc": [0.31, 0.35, 0.28, 0.40], "standalone_acc": [0.90, 0.91, 0.89, 0.93]}))
    (root / "results.json").write_text(json.dumps(RESULTS))
    return root


def partial(pipeline: Path, tmp_path: Path, *stages: str) -> Path:
    """A pipeline directory holding copies of only these stages."""
    root = tmp_path / "partial"
    for stage in stages:
        shutil.copytree(pipeline / stage, root / stage)
    return root


def test_pareto_front():
    assert pareto_front([1, 2, 3, 4], [0.5, 0.4, 0.7, 0.6]) == [0, 2]


@pytest.mark.slow
def test_full_pipeline_draws_every_section(pipeline, tmp_path):
    report = make_report(pipeline, tmp_path / "out")
    assert report.path == tmp_path / "out" / "report.html" and not report.missing
    drawn = {s.source.name: s for s in report.sections}
    for stage, images in STAGE_IMAGES.items():
        assert drawn[stage].images == images, (stage, drawn[stage].notes)
        for name in images:
            assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")
    titled = {s.title: s for s in report.sections}
    final = titled["Final results"].table
    assert [row[0] for row in final] == ["method", "baseline", "hpo", "nas"] and final[3][1] == "94.00%"
    assert "one seed" in " ".join(titled["Final results"].notes)
    assert [row[0] for row in titled["What each step bought"].table[1:]] == [
        "HPO best − baseline", "NAS answer − baseline", "NAS answer − HPO best"]
    assert titled["HPO best against the baseline"].table[0] == ["hyper-parameter", "baseline", "HPO best", "searched"]
    search_notes = " ".join(drawn["search"].notes)
    assert "ranked by held-out loss" in search_notes and "Rank 1 (star): trial" in search_notes
    assert "noise floor" in " ".join(drawn["nas_eval"].notes)
    text = report.path.read_text()
    assert "Not (yet) available" not in text and "Kendall τ = 1.000" in text and "Space shrunk after epoch 1" in text
    assert "http" not in text and "<script" not in text  # opens offline, needs no JavaScript


@pytest.mark.slow
def test_partial_pipeline_names_what_is_missing(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline", "hpo")
    path = write_report(root)
    assert path == root / "report" / "report.html"
    report = make_report(root)
    assert [s.source.name for s in report.sections] == ["baseline", "hpo", "best.json"]
    missing = "\n".join(what for what, _ in report.missing)
    for name in ("results.json", "hpo_best/", "supernet/", "search/", "select/", "retrain/", "nas_eval/"):
        assert name in missing
    text = path.read_text()
    assert "Not (yet) available" in text and f"effcifar supernet train --out {root}/supernet" in text
    assert (root / "report" / "hpo_parallel.png").is_file()


@pytest.mark.slow
def test_pipeline_with_only_a_training_run(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline")
    report = make_report(root)
    assert [s.images for s in report.sections] == [["baseline_curves.png"]]
    assert len(report.missing) == 8 and "Hyper-parameter search (hpo/)" in report.path.read_text()


@pytest.mark.slow
def test_single_runs_and_an_unfinished_training_run(pipeline, tmp_path):
    report = make_report(pipeline / "baseline", tmp_path / "a")
    assert report.sections[0].images == ["training_curves.png"] and report.sections[0].table and not report.missing
    assert make_report(pipeline / "search", tmp_path / "b").sections[0].images == ["search_progress.png",
                                                                                   "search_flops.png"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(pipeline / "baseline", unfinished)
    (unfinished / "summary.json").unlink()
    section = make_report(unfinished).sections[0]
    assert section.images == ["training_curves.png"] and "has not finished" in " ".join(section.notes)


@pytest.mark.slow
def test_a_search_holding_its_selection_and_retraining_is_still_a_search(pipeline, tmp_path):
    search = tmp_path / "search"  # select, retrain and nas-eval write into the run they read, by default
    shutil.copytree(pipeline / "search", search)
    for stage in ("select", "retrain"):
        shutil.copytree(pipeline / stage, search / stage)
    report = make_report(search, tmp_path / "out")
    assert [s.images for s in report.sections] == [["search_progress.png", "search_flops.png"]] and not report.missing


@pytest.mark.slow
def test_a_retrain_run_of_its_own_is_reported(pipeline, tmp_path):
    search = tmp_path / "search"
    shutil.copytree(pipeline / "search", search)
    retrain_top(search, 1, tmp_path / "retrain",
                base=TrainConfig(**{**TINY_BASE, "epochs": 1, "peak_epoch": 0.5, "threads": 1, **NARROW}))
    section = make_report(tmp_path / "retrain", tmp_path / "out").sections[0]
    assert section.title == "Architectures retrained from scratch" and section.table[1][0] == "top_1"


@pytest.mark.slow
def test_hpo_with_one_trial_says_why_importances_are_missing(pipeline, tmp_path):
    trials = load_study(HpoConfig, pipeline / "hpo" / "hpo.yaml").trials
    assert param_importances(trials[:1]) == ({}, "needs at least 2 complete trials, there is 1")


def test_what_each_step_bought_with_several_training_seeds(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline", "hpo")
    common = {"train_time": 10.0, "params": 1000, "flops": 2_000_000, "seeds": [0, 1], "test_images": 10000}
    (root / "results.json").write_text(json.dumps([
        {**common, "name": "baseline", "test_acc": 0.90, "test_accs": [0.89, 0.91], "test_acc_sd": 0.01414,
         "run": "baseline"},
        {**common, "name": "hpo", "test_acc": 0.93, "test_accs": [0.925, 0.935], "run": "hpo_best"},
        {**common, "name": "nas", "test_acc": 0.93, "test_accs": [0.925, 0.935], "run": "hpo_best",
         "answer": "incumbent"}]))
    sections = {s.title: s for s in make_report(root).sections}
    assert sections["Final results"].table[1] == ["baseline", "90.00% ± 1.41% (n=2)", "10.0", "1,000", "2.0"]
    assert sections["Final results"].table[3][0] == "nas (incumbent)"
    gains = sections["What each step bought"].table
    assert gains[1] == ["HPO best − baseline", "+3.00", "± 0.71 s.d.", "2 training seeds, paired by seed"]
    assert gains[3] == ["NAS answer − HPO best", "+0.00", "—", "the same run (the incumbent won the selection)"]


def test_one_seed_differences_carry_the_test_sampling_error(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline")
    (root / "results.json").write_text(json.dumps([{**r, "test_images": 10000} for r in RESULTS]))
    gains = {s.title: s for s in make_report(root).sections}["What each step bought"]
    assert gains.table[1] == ["HPO best − baseline", "+2.00", "± 0.38 s.e.",
                              "one seed each: test-set sampling error only"]
    assert "One training seed per final run" in " ".join(gains.notes)


def test_what_nas_bought_with_one_limit_is_one_sentence(pipeline, tmp_path):
    section = {s.title: s for s in make_report(pipeline, tmp_path / "out").sections}[FRONT_TITLE]
    sentences = [note for note in section.notes if note.startswith("With no FLOPs limit: ")]  # select ran unlimited
    assert len(sentences) == 1 and "Held out at the last rung (epoch 1): " in sentences[0]
    assert ("vs HPO best" in sentences[0]) != ("the baseline stands" in sentences[0])
    assert section.images == ["select_front.png"] and [row[0] for row in section.table] == ["FLOPs limit (M)", "none"]


def selection(answer: str) -> SelectionResult:
    """A selection of five candidates: the incumbent, a finished and two pruned proposals, a width-curve point."""
    def row(name, source, acc, flops, epochs, state="COMPLETE"):
        return {"name": name, "source": source, "holdout_acc": acc, "flops": flops, "epochs": epochs, "state": state}

    rows = [row("incumbent", "incumbent", 0.40, 3_000_000, 4), row("proposal_0", "search", 0.42, 2_000_000, 4),
            row("proposal_1", "search", None, 2_500_000, 1, "PRUNED"),
            row("proposal_2", "search", None, 1_500_000, 3, "PRUNED"),
            row("resnet_0.5x", "width curve", 0.35, 800_000, 4)]
    return SelectionResult(answer, rows, [1, 3, 4], 0, 0.0, "")


def test_each_limits_sentence_sets_the_answer_against_the_hpo_best_with_its_spread_and_evidence():
    incumbent = selection("incumbent").rows[0]
    evidence = ("Held out at the last rung (epoch 4): proposal_0 42.00%, incumbent 40.00%, resnet_0.5x 35.00%; "
                "proposals: 1 pruned after epoch 1; 1 pruned after epoch 3.")
    assert front_sentence(3e6, selection("proposal_0"), incumbent, 2000, None) == (
        "Under 3 MFLOPs: NAS network proposal_0 42.00% at 2.00 MFLOPs vs HPO best 40.00% at 3.00 MFLOPs: +2.00 ± 1.55 "
        "s.e. points (1 seed; held-out accuracy, ± its sampling error on 2000 held-out images). " + evidence)
    for answer in ("incumbent", "resnet_0.5x"):
        assert "Under 3 MFLOPs: no candidate beat the tuned baseline under this limit: the baseline stands (" + answer \
            in front_sentence(3e6, selection(answer), incumbent, 2000, None)
    common = {"seeds": [0, 1, 2], "flops": 2_000_000, "run": "retrain/answer"}
    final = ({**common, "test_accs": [0.41, 0.43, 0.42]}, {**common, "test_accs": [0.40, 0.40, 0.41], "run": "hpo_best",
                                                            "flops": 3_000_000})
    assert front_sentence(3e6, selection("proposal_0"), incumbent, 2000, final) == (
        "Under 3 MFLOPs: NAS network proposal_0 42.00% at 2.00 MFLOPs vs HPO best 40.33% at 3.00 MFLOPs: +1.67 ± 0.67 "
        "s.e. points (3 seeds; test accuracy of the final runs, paired by seed). " + evidence)


def test_wall_time_per_stage_from_the_stage_markers(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline", "hpo")
    (root / "baseline" / "stage.json").write_text(json.dumps({"stage": "baseline", "fingerprint": "x",
                                                              "finished": "2026-12-07T08:00:00", "seconds": 75.5}))
    (root / "hpo" / "stage.json").write_text(json.dumps({"stage": "hpo", "fingerprint": "y", "finished": None}))
    times = {s.title: s for s in make_report(root).sections}["Wall time per stage"].table
    assert times == [["stage", "wall time", "state"], ["baseline", "1 min 15 s", "finished"],
                     ["hpo", "—", "started, not finished"], ["all stages", "1 min 15 s", ""]]


def test_hpo_best_beside_the_baseline(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline", "hpo")
    table = {s.title: s for s in make_report(root).sections}["HPO best against the baseline"].table
    best = json.loads((root / "hpo" / "best.json").read_text())
    assert [row[0] for row in table[1:]] == list(TINY_SPACE)
    assert table[1][1:3] == ["0.4", f"{best['peak_lr']:.4g}"] and table[1][3].startswith("loguniform")


@pytest.mark.slow
def test_a_folder_of_the_users_own_is_not_written_into(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY_BASE, "epochs": 1, "peak_epoch": 0.5, "threads": 1, "precision": "fp32"}), run,
          data=make_synthetic(n_train=300, n_test=200))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"mine: holds files that are not a report; choose another --out"):
        make_report(run, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert make_report(run, tmp_path / "new").path.is_file()  # a new or empty folder is fine, and so is a report's
    assert make_report(run, tmp_path / "new").path.is_file()


def test_not_a_run_directory_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory") as error:
        write_report(tmp_path)
    assert "\n" not in str(error.value)
    r = subprocess.run([sys.executable, "-m", "effcifar", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a run directory" in r.stderr
    stopped = tmp_path / "stopped"  # a training run stopped before its first epoch ended
    stopped.mkdir()
    (stopped / ".kind").write_text("train\n")
    with pytest.raises(ConfigError, match=r"stopped: a training run with nothing to draw yet"):
        write_report(stopped)


@pytest.mark.slow
def test_cli_prints_the_page_and_the_sections(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline")
    r = subprocess.run([sys.executable, "-m", "effcifar", "report", str(root), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "out" / "report.html") in r.stdout
    assert "Baseline training" in r.stdout and "missing" in r.stdout and "effcifar hpo run" in r.stdout


@pytest.mark.slow
def test_an_unreadable_part_of_a_pipeline_is_named_and_the_rest_drawn(pipeline, tmp_path):
    root = partial(pipeline, tmp_path, "baseline")
    (root / "results.json").write_bytes(b"\xff\xfe[]")
    r = subprocess.run([sys.executable, "-m", "effcifar", "report", str(root)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"not drawn: Final results: {root / 'results.json'}: not a UTF-8 text file (byte 0xff at offset 0)" in \
        " ".join(r.stdout.split())
    assert (root / "report" / "baseline_curves.png").is_file() and not (root / "report" / ".lock").exists()


@pytest.mark.slow
def test_report_loads_in_headless_chromium(browser, pipeline, tmp_path):
    from selenium.webdriver.common.by import By

    path = write_report(pipeline, tmp_path / "out")
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == sum(len(v) for v in STAGE_IMAGES.values()) + 1  # and the front of what NAS bought
    broken = [i.get_attribute("src") for i in images
              if not browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)]
    assert not broken
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "What each step bought" in text and "HPO best − baseline" in text
    # the whole page, drawn: a screenshot with text and figures, not a blank or an error page
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height, 12000))
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    pixels = matplotlib.image.imread(io.BytesIO(screenshot.read_bytes()))[..., :3]
    dark = float(np.mean(pixels.mean(axis=2) < 0.4))  # text, axes and markers
    colour = float(np.mean(pixels.max(axis=2) - pixels.min(axis=2) > 0.3))  # plotted data in colour
    assert pixels.shape[0] > 2000 and 0.002 < dark < 0.5 and colour > 0.001, (pixels.shape, dark, colour)
