"""`somnus bench sleep`: the scenario's data, its measures, and a tiny run through the real CLI.

The tiny random model learns nothing, so the run checks the machinery and the JSON (shape, ranges,
the CR formula); whether sleep works is what the command measures on the bundled model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from assistant.bench import sleep as bench
from assistant.nano import evaluate
from assistant.sleep.gate import kept_training

ABLATIONS = {"with_dream"}
METHODS = {"in_context", "floor", "retrieval", "sleep", "finetune", "with_lti"} | ABLATIONS
PER_DATA_SET = {"methods", "retention", "in_context_drop", "nights", "seconds_per_night", "latest_recall",
                "each_night", "per_night", "forget", "ablations", "skipped"}

STORY = """\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Mary travelled to the kitchen.
5 Where is Mary? \tkitchen\t4
1 John journeyed to the garden.
2 Sandra went back to the office.
3 Where is John? \tgarden\t1
"""


def test_generated_nights_tell_facts_and_probe_them_with_held_out_phrasings():
    nights = bench.generated_nights(seed=3, nights=3, sessions=4, facts=3)
    assert len(nights) == 3 and all(len(n.sessions) == 4 and len(n.questions) == 12 for n in nights)
    for night in nights:
        assert len({q.slot for q in night.questions}) == len(night.questions)  # no topic twice a night
        for question in night.questions:
            told = " ".join(m["content"] for m in night.sessions[question.session])
            assert evaluate.answered(told, question.value)  # its session holds the answer
            assert question.text not in told and "?" not in told  # sessions only tell
    assert bench.generated_nights(3, 3, 4, 3) == nights  # seeded


def test_babi_nights_tell_one_story_a_night_and_ask_where_everyone_ended(tmp_path):
    path = tmp_path / evaluate.BABI_FILE
    path.write_text(STORY)
    first, second = bench.babi_nights(path, nights=2, seed=0)
    if first.sessions[0][0]["content"].startswith("John"):  # the seeded start may be either story
        first, second = second, first
    expected = {("Where is Mary?", "kitchen"), ("Where is John?", "hallway")}
    assert {(q.text, q.value) for q in first.questions} == expected
    told = [m["content"] for m in first.sessions[0] if m["role"] == "user"]
    assert told == ["Mary moved to the bathroom.\nJohn went to the hallway.", "Mary travelled to the kitchen."]
    assert {q.slot for q in second.questions} == {"John.location", "Sandra.location"}
    mary = [i for i, q in enumerate(first.questions) if q.slot == "Mary.location"]
    assert bench.unsuperseded([first, second]) == mary  # John moves again on night 2


def test_babi_nights_on_the_real_file_end_where_the_last_question_says():
    path = evaluate.find_babi(None)
    if path is None:
        pytest.skip("no bAbI qa1 file in ../shared/data/babi")
    stories = evaluate.read_babi(path)
    nights = bench.babi_nights(path, nights=len(stories), seed=0)
    start = next(i for i, s in enumerate(stories) if s[0].lines == nights[0].sessions[0][0]["content"].split("\n"))
    for offset, night in enumerate(nights):
        final = stories[(start + offset) % len(stories)][-1]  # asked after the story's last line
        assert night.questions and {"Where is " + final.question.split()[-1]: final.answer}.items() <= {
            q.text: q.value for q in night.questions}.items()


def test_measures():
    assert bench.consolidation_ratio(0.5, 0.1, 0.9) == pytest.approx(0.5)
    assert bench.consolidation_ratio(0.5, 0.3, 0.3) is None
    assert bench.retention([True, True, False], [True, False, False], kept=[0, 1]) == 0.5
    assert bench.retention([False, True], [True, True], kept=[0]) is None  # nothing recalled after night 1
    night = lambda *slots: bench.Night([[]], [bench.Question("q", v, s, 0) for s, v in slots])
    nights = [night(("a", "1"), ("b", "2")), night(("b", "3"))]
    assert bench.unsuperseded(nights) == [0]
    assert {(q.slot, q.value) for q in bench.latest_questions(nights)} == {("a", "1"), ("b", "3")}


def test_each_recall_comes_with_its_wilson_interval():
    assert bench.wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = bench.wilson(0.0, 67)  # no hit in 67 probes still allows up to about 5%
    assert low == 0.0 and high == pytest.approx(0.0542, abs=1e-4)
    assert bench.wilson(None, 10) is None and bench.wilson(0.5, 0) is None


def test_every_night_pools_its_probes_weighted_by_their_number():
    pooled = bench.each_night([0.5, 1.0, None], [1.0, 1.0, None], [0.0, 0.5, None], probes=[2, 6, 0])
    assert pooled["recall"] == pytest.approx((0.5 * 2 + 1.0 * 6) / 8)
    assert pooled["floor"] == pytest.approx(0.375) and pooled["in_context"] == 1.0
    assert pooled["cr"] == pytest.approx((0.875 - 0.375) / (1.0 - 0.375)) and pooled["probes"] == 8


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-sleep")
    out = folder / "bench.json"
    command = [sys.executable, "-m", "cli", "--home", str(folder / "home"), "--model", str(tiny_model_dir),
               "--backend", "torch", "bench", "sleep", "--json", str(out), "--babi", str(folder / "no-babi"),
               "--nights", "2", "--sessions", "2", "--facts", "2", "--steps", "2", "--seed", "7"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stderr


@pytest.mark.slow
def test_a_tiny_run_writes_the_json_with_every_method(tiny_run):
    report, _ = tiny_run
    assert {"generated", "babi", "seed", "seconds"} <= set(report) and report["seed"] == 7
    generated = report["generated"]
    assert PER_DATA_SET <= set(generated) and set(generated["methods"]) == METHODS
    assert generated["nights"] == 2 and [n["night"] for n in generated["per_night"]] == [1, 2]
    assert generated["methods"]["finetune"]["steps"] >= 1
    fractions = [m["recall"] for m in generated["methods"].values()]
    fractions += [generated["latest_recall"]] + [n["recall"] for n in generated["per_night"]]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    for method in generated["methods"].values():
        assert method["seconds"] >= 0 and method["cpu_seconds"] >= 0 and method["peak_rss_mb"] > 0
        assert method["probes"] == 4
        assert method["reading"] == generated["methods"]["in_context"]["recall"]
        assert tuple(method["recall_interval"]) == pytest.approx(bench.wilson(method["recall"], 4))
    assert 0.0 <= generated["methods"]["retrieval"]["found"] <= 1.0
    assert generated["retention"] is None or generated["retention"] >= 0
    assert -100 <= generated["in_context_drop"] <= 100
    each = generated["each_night"]
    assert each["probes"] == 8 and each["promoted"] == sum(n["status"] == "promoted" for n in generated["per_night"])
    assert each["recall"] == pytest.approx(sum(n["recall"] for n in generated["per_night"]) / 2)
    assert [n["kept"] for n in generated["per_night"]] == [kept_training(n["training"]) for n in generated["per_night"]]
    assert each["in_context"] is not None and each["floor"] is not None
    forgot = generated["forget"]  # night 2's first session, forgotten: no file keeps a word it said
    assert (forgot["probes"], forgot["kept_probes"], forgot["files_holding_it"]) == (2, 2, [])
    assert all(0.0 <= forgot[key] <= 1.0 for key in ("recall", "recall_before", "floor", "kept_recall", "kept_before"))


@pytest.mark.slow
def test_the_dreaming_ablations_sleep_two_nights_beside_the_full_sleep(tiny_run):
    generated = tiny_run[0]["generated"]
    ablations = generated["ablations"]
    assert set(ablations) == ABLATIONS | {"sleep"}
    assert ablations["sleep"]["recall"] == generated["per_night"][1]["recall"]  # the same run's night 2
    for name, row in ablations.items():
        assert row["night"] == 2 and row["probes"] == 4 and 0.0 <= row["recall"] <= 1.0
        assert {"recall", "cr", "seconds", "status"} <= set(row)
        if name in ABLATIONS:
            assert generated["methods"][name] == row
    assert ablations["sleep"]["chosen"] is None  # the default sleep never dreams, so there was nothing to choose


@pytest.mark.slow
def test_cr_follows_its_formula(tiny_run):
    methods = {name: m for name, m in tiny_run[0]["generated"]["methods"].items() if name not in ABLATIONS}
    floor, ceiling = methods["floor"]["recall"], methods["in_context"]["recall"]
    for method in methods.values():
        expected = None if ceiling == floor else (method["recall"] - floor) / (ceiling - floor)
        assert method["cr"] == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.slow
def test_without_a_babi_file_the_babi_part_says_so(tiny_run):
    report, stderr = tiny_run
    babi = report["babi"]
    assert "no bAbI file" in babi["skipped"] and "--babi" in babi["skipped"]
    assert babi["methods"] == {} and babi["nights"] == 0 and report["babi_file"] is None
    assert "no bAbI file" in stderr  # the table says it too


@pytest.mark.slow
def test_the_table_shows_the_first_night_and_the_ablations_night(tiny_run):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench.results_table(tiny_run[0]))
    lines = [line for line in console.export_text().splitlines() if "│ generated │ sleep" in line]
    assert len(lines) == 2 and "night 2" not in lines[0] and "night 2" in lines[1]


def test_the_table_says_how_far_each_trained_method_went():
    from rich.console import Console

    def row(recall, **more):
        return {"recall": recall, "cr": None, "seconds": 1.0, "cpu_seconds": 1.0, "peak_rss_mb": 1.0, **more}

    each = {"probes": 2, "promoted": 1, "recall": 0.5, "cr": None, "in_context": 1.0, "floor": 0.0}
    generated = {"methods": {"floor": row(0.0), "sleep": row(0.5, status="promoted", kept="240 of 360 steps"),
                             "finetune": row(0.0, steps=122)}, "each_night": each, "nights": 1, "retention": None,
                 "latest_recall": 0.5, "in_context_drop": 0.0, "seconds_per_night": 1.0, "skipped": None}
    result = {"model": "m", "seed": 1, "seconds": 3.0, "generated": generated,
              "babi": {**generated, "skipped": "--quick"}}
    console = Console(record=True, width=200)
    console.print(bench.results_table(result))
    text = console.export_text()
    assert "sleep (promoted, 240 of 360 steps)" in text and "finetune (122 steps)" in text
    assert "floor (" not in text


@pytest.mark.slow
def test_a_quick_run_is_one_night_of_the_methods_a_user_weighs(tiny_model_dir, tmp_path):
    out = tmp_path / "quick.json"
    command = [sys.executable, "-m", "cli", "--home", str(tmp_path / "home"), "--model", str(tiny_model_dir),
               "--backend", "torch", "bench", "sleep", "--quick", "--json", str(out), "--sessions", "2",
               "--facts", "2", "--steps", "2", "--budget", "1", "--seed", "7"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    generated = report["generated"]
    assert set(generated["methods"]) == {"in_context", "floor", "retrieval", "sleep", "finetune"}
    assert generated["nights"] == 1 and generated["ablations"] == {} and generated["supersession"] is None
    assert generated["forget"] is None  # a forget costs a night: the full run measures it
    assert report["settings"]["budget_minutes"] == 1 and report["settings"]["quick"] is True
    assert "--quick" in report["babi"]["skipped"]
