"""tools/tradeoff_benchmark.py: the Pareto front and the recommended setting on generated points with known
answers; and a real run on dev images with the shipped CrossCT weights, whose F1 must equal what the bundle's
own evaluation gives for the same setting."""

from __future__ import annotations

import json
from pathlib import Path

import bundle_runs as runs

tool = runs.tool_module("tradeoff_benchmark")

IMAGES = ["dsb_9774c8239632.png", "dsb_52a6b8ae4c8e.png"]


def test_pareto_front_keeps_only_points_nothing_beats():
    seconds = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    f1 = [0.50, 0.60, 0.55, 0.60, 0.40, 0.70]
    # 2 is beaten by 1 (same time, better), 3 by 1 (faster, same F1); the rest trade speed for F1
    assert tool.pareto_front(seconds, f1) == [4, 0, 1, 5]
    assert tool.pareto_front([1.0, 1.0], [0.5, 0.5]) == [0, 1]  # ties beat nothing


def test_recommended_is_the_fastest_within_the_tolerance_of_the_best():
    seconds = [10.0, 2.0, 1.0, 0.5]
    f1 = [0.700, 0.695, 0.689, 0.60]
    assert tool.recommended(seconds, f1, tolerance=0.01) == 1
    assert tool.recommended(seconds, f1, tolerance=0.02) == 2
    assert tool.recommended(seconds, f1, tolerance=0.0) == 0


def test_plot_numbers_every_setting_and_names_them_in_a_key_front_first():
    lines = [
        {"setting": {}, "s_per_mpx": 1.0, "f1": 0.5, "default": True},
        {"setting": {"overlap": 0.5}, "s_per_mpx": 2.0, "f1": 0.4, "default": False},  # beaten by the default
        {"setting": {"roi_size": [320, 320]}, "s_per_mpx": 3.0, "f1": 0.6, "default": False},
    ]
    figure = tool.plot_figure(lines, "title")
    axes = figure.axes[0]
    annotations = [child.get_text() for child in axes.texts if hasattr(child, "xy")]
    assert annotations == ["1", "2", "3"]
    key = [child.get_text() for child in axes.texts if not hasattr(child, "xy")]
    assert key == ["on the front, fastest first:\n1: default\n3: roi_size=[320, 320]\n\noff the front:\n2: overlap=0.5"]
    figure.canvas.draw()
    ticks = {label.get_text() for label in axes.get_xticklabels(minor=True) + axes.get_xticklabels()} - {""}
    assert {"1", "2", "3"} <= ticks and not any("times" in tick or "^" in tick for tick in ticks)


def test_plot_circles_a_default_measured_twice_with_one_legend_entry():
    lines = [
        {"setting": {}, "s_per_mpx": 1.0, "f1": 0.5, "default": True},
        {"setting": {"overlap": 0.5}, "s_per_mpx": 2.0, "f1": 0.6, "default": False},
        {"setting": {}, "s_per_mpx": 1.2, "f1": 0.5, "default": True},  # the same setting again, timed later
    ]
    axes = tool.plot_figure(lines, "title").axes[0]
    circles = [c for c in axes.collections if len(c.get_edgecolor()) and c.get_sizes()[0] == 250]
    assert len(circles) == 2
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend.count("shipped default") == 1


def test_plain_log_ticks_label_every_tick_within_a_decade_and_fewer_across_decades():
    narrow, wide = tool.plain_log_ticks(5.0, 25.0), tool.plain_log_ticks(1.0, 300.0)
    assert [narrow(v, 0) for v in (6.0, 7.0, 10.0, 20.0)] == ["6", "7", "10", "20"]
    assert [wide(v, 0) for v in (2.0, 3.0, 10.0, 50.0, 70.0)] == ["2", "", "10", "50", ""]


def test_rounds_time_the_grid_pass_after_pass_and_report_each_settings_median(tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "labeled"
    (dataset / "images").mkdir(parents=True)
    (dataset / "labels").mkdir()
    (dataset / "images" / "a.png").write_bytes(b"")  # never read: measure is replaced below
    (dataset / "labels" / "a_label.tiff").write_bytes(b"")
    # {}'s first timing is the untimed warm-up's
    timings = {"{}": iter([9.0, 5.0, 9.0, 6.0]), '{"overlap": 0.5}': iter([3.0, 2.0, 4.0])}
    calls = []

    def fake_measure(bundle, items, overrides, checkpoint=None):
        key = json.dumps(overrides)
        calls.append(key)
        return {"bundle": bundle, "setting": overrides, "default": not overrides, "f1": 0.5 if not overrides else 0.6,
                "s_per_mpx": next(timings[key]), "images": len(items), "per_image_f1": {"a": 0.5}}

    monkeypatch.setattr(tool, "measure", fake_measure)
    tool.tradeoff("mt2", dataset_dir=str(dataset), settings='[{}, {"overlap": 0.5}]', output_dir=str(tmp_path),
                  rounds=3)
    assert calls == ["{}"] + ['{}', '{"overlap": 0.5}'] * 3  # the warm-up, then the whole grid pass after pass
    lines = [json.loads(line) for line in (tmp_path / "tradeoff_mt2.jsonl").read_text().splitlines()]
    assert [line["s_per_mpx_rounds"] for line in lines] == [[5.0, 9.0, 6.0], [3.0, 2.0, 4.0]]
    assert [line["s_per_mpx"] for line in lines] == [6.0, 3.0]
    assert [line["recommended"] for line in lines] == [False, True]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:2]]
    assert [line["s_per_mpx"] for line in printed] == [6.0, 3.0]


def test_a_real_run_scores_as_the_bundle_evaluation_does(dev_dir, tmp_path, capsys):
    dataset = runs.folder_of_links(dev_dir, IMAGES, tmp_path / "labeled", with_labels=True)
    settings = [{}, {"postprocess": "distance"}]
    tool.tradeoff("crossct", dataset_dir=str(dataset), settings=json.dumps(settings), output_dir=str(tmp_path / "out"))
    lines = [json.loads(line) for line in (tmp_path / "out" / "tradeoff_crossct.jsonl").read_text().splitlines()]
    assert [line["setting"] for line in lines] == settings
    assert [line["default"] for line in lines] == [True, False]
    assert all(line["s_per_mpx"] > 0 and set(line["per_image_f1"]) == {Path(n).stem for n in IMAGES} for line in lines)
    assert sum(line["recommended"] for line in lines) == 1
    assert (tmp_path / "out" / "tradeoff_crossct.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plot"].endswith("tradeoff_crossct.png")

    # the same setting through the bundle's evaluate.yaml gives the same per-image F1
    bundle = runs.REPO / "bundles" / "crossct_cell_segmentation"
    result = runs.run_bundle_command(
        "evaluating", "--config_file", str(bundle / "configs" / "evaluate.yaml"),
        "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "eval"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = (tmp_path / "eval" / "f1_scores.csv").read_text().strip().splitlines()[1:]
    evaluated = {row.split(",")[0]: round(float(row.split(",")[-1]), 4) for row in rows}
    assert evaluated == lines[0]["per_image_f1"]


def test_override_files_change_only_settings_inference_yaml_has_and_build():
    """inference_quality.yaml, inference_fast.yaml and inference_paper.yaml merged after inference.yaml: every key
    they set is an inference setting (a misspelt key would silently add a new one), and the merged inferer is built
    with their values."""
    import yaml
    from monai.bundle import ConfigParser

    overrides = sorted((runs.REPO / "bundles").glob("*/configs/inference_*.yaml"))
    assert {path.name for path in overrides} == {"inference_quality.yaml", "inference_fast.yaml", "inference_paper.yaml"}
    for path in overrides:
        base = path.parent / "inference.yaml"
        settings = yaml.safe_load(path.read_text())
        assert set(settings) <= set(yaml.safe_load(base.read_text())), path
        parser = ConfigParser()
        parser.read_config([str(base), str(path)])
        parser.update({"bundle_root": str(path.parents[1])})
        for key, value in settings.items():
            assert parser.get_parsed_content(key) == value, (path, key)
        assert parser.get_parsed_content("inferer") is not None
