"""The ablation plan derives its tasks from the stages' declarations (strokeseg.stages): every
planned command parses with the script's own parser to the declared settings, the declared
outputs are what the stages write, and a task is complete only while the stage's own record of
its settings agrees with the plan."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from strokeseg import ablation, demo
from strokeseg.ablation import Task
from strokeseg.stages import FOLD, STAGES, Flag, _same, with_fold

REPO = Path(__file__).resolve().parents[1]


def _plans(tmp_path: Path) -> list[ablation.Plan]:
    return [ablation.load_plan(REPO / "ablation.json"), ablation.load_plan(demo.write_grid(tmp_path, demo.SMALL))]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _argv(task: Task, redo: bool = False) -> list[str]:
    """The planned command's arguments after the script."""
    command = ablation.command(task, "python", redo)
    return command[command.index(task.stage.script) + 1:]


def test_every_planned_command_parses_with_the_scripts_parser_to_the_declared_settings(tmp_path):
    seen = set()
    for plan in _plans(tmp_path):
        for task in plan.tasks():
            stage = task.stage
            assert stage.decl is STAGES[stage.script] and stage.outputs == stage.decl.outputs(stage.settings)
            module = importlib.import_module(stage.script.removesuffix(".py"))
            parsed = _jsonable(vars(module.parse_args(_argv(task))))
            for flag in stage.decl.flags:
                value = stage.settings.get(flag.dest)
                if value is not None:
                    assert flag.dest in parsed and _same(with_fold(value, task.fold), parsed[flag.dest]), (task.key, flag, value, parsed.get(flag.dest))
            assert parsed["overwrite"] is False and vars(module.parse_args(_argv(task, redo=True)))["overwrite"] is True
            seen.add(stage.script)
    assert seen == set(STAGES)  # every declaration is planned and checked


def test_flags_render_and_an_undeclared_setting_is_refused():
    assert Flag("--compare", "compare", repeat=True).words([["a", "b"], ["c", "d"]]) == ["--compare", "a", "b", "--compare", "c", "d"]
    assert Flag("--datasets", "datasets").words(["ATLAS", "UOA"]) == ["--datasets", "ATLAS", "UOA"]
    assert Flag("--resume-if-exists", "resume_if_exists").words(True) == ["--resume-if-exists"] and Flag("--x", "x").words(None) == []
    decl = STAGES["preprocess_brats2024_t2flair.py"]
    assert decl.argv({"brats_dir": "in", "output_dir": "out", "workers": 3}, ["--margin", "2"]) == (
        "--brats-dir", "in", "--output-dir", "out", "--margin", "2", "--workers", "3")
    with pytest.raises(ValueError, match="no declared flag for brats_folder"):
        decl.argv({"brats_folder": "in"})


# --------------------------------------------------------------------------- real stage outputs


def _grid(tmp_path: Path, isles: Path, atlas: Path, overlap: float = 0.01) -> Path:
    """The paper's grid on the synthetic ISLES and ATLAS data, ATLAS only, one fold."""
    grid = json.loads((REPO / "ablation.json").read_text())
    config = json.loads((REPO / "config.json").read_text())
    config["preprocessing"]["use_gpu"] = False
    for dataset in config["datasets"]:
        dataset["data_dir"] = str(atlas if dataset["name"] == "ATLAS" else tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(config))
    grid.update(work_dir=str(tmp_path / "work"), folds=[0])
    grid["data"] = {"isles": str(isles), "brats": str(tmp_path / "brats"), "foundation_config": str(tmp_path / "config.json")}
    grid["stroke"]["datasets"] = ["ATLAS"]
    grid["compare"] = {"ATLAS": grid["compare"]["ATLAS"]}
    grid["architectures"]["resnet18"]["min_lesion_overlap"] = overlap
    grid["args"]["extract_patches"] = ["--max_patches", "3"]
    for kind in ("preprocess", "extract_patches"):
        grid["resources"][kind]["cpus"] = 1  # --workers 1: the cases in this process
    path = tmp_path / f"grid_{overlap}.json"
    path.write_text(json.dumps(grid))
    return path


def _run_stage(plan: ablation.Plan, key: str, *more: str) -> Task:
    """Run the task ``key`` of ``plan`` in this process with its planned arguments (plus ``more``)."""
    task = next(t for t in plan.tasks() if t.key == key)
    module = importlib.import_module(task.stage.script.removesuffix(".py"))
    assert module.main([*ablation.command(task, "python")[2:], *more]) == 0
    return task


def test_declared_outputs_are_what_the_stages_write_and_settings_decide_completeness(tmp_path, synthetic_isles_a, synthetic_atlas, capsys):
    plan = ablation.load_plan(_grid(tmp_path, synthetic_isles_a, synthetic_atlas))
    tasks = [_run_stage(plan, key) for key in ("preprocess_v2_isles", "preprocess_stroke_foundation", "extract_patches_96")]
    for task in tasks:
        recorded = [Path(p) for p in task.stage.decl.recorded(task.stage.settings)]
        assert all(Path(p).is_file() for p in task.stage.outputs) and all(p.is_file() for p in recorded), task.key
        assert ablation.is_complete(task) and ablation.plan.settings_mismatches(task) == []
        assert ablation.task_state(plan, task) == "pending"  # finished, but not recorded by the plan
        ablation.record_path(task).write_text(ablation.record_text(plan, task))
        assert ablation.task_state(plan, task) == "complete"
    patches = tasks[2]
    # a changed grid value: the finished patch task (and nothing before it) is no longer complete
    changed = ablation.load_plan(_grid(tmp_path, synthetic_isles_a, synthetic_atlas, overlap=0.02))
    states = {t.key: ablation.task_state(changed, t) for t in changed.tasks() if t.key in {task.key for task in tasks}}
    assert states == {"preprocess_v2_isles": "complete", "preprocess_stroke_foundation": "complete", "extract_patches_96": "stale"}
    assert ablation.main(["--config", str(tmp_path / "grid_0.02.json"), "--pending"]) == 0
    assert "extract_patches_96" in capsys.readouterr().out.split()
    # the stage rerun by hand with another setting into the planned folder: its run_args.json says so
    _run_stage(plan, "extract_patches_96", "--min_lesion_overlap", "0.5", "--overwrite")
    assert ablation.is_complete(patches) and ablation.record_path(patches).read_text() == ablation.record_text(plan, patches)
    problems = ablation.plan.settings_mismatches(patches)
    assert len(problems) == 1 and "--min_lesion_overlap was 0.5, the plan asks 0.01" in problems[0]
    assert ablation.task_state(plan, patches) == "stale"
    _run_stage(plan, "extract_patches_96", "--overwrite")  # what a redo runs: complete again
    assert ablation.task_state(plan, patches) == "complete"


def test_training_record_is_checked_per_fold_and_older_records_still_read(tmp_path, monkeypatch):
    grid = json.loads((REPO / "ablation.json").read_text())
    grid["work_dir"] = str(tmp_path / "work")
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    plan = ablation.load_plan(tmp_path / "grid.json")
    monkeypatch.setattr(ablation.plan, "is_complete", lambda task: True)  # the outputs themselves are tested above
    train = [t for t in plan.tasks() if t.stage.name == "train_isles_shared_brats" and t.fold in (0, 1)]
    for task in train:
        ablation.record_path(task).parent.mkdir(parents=True, exist_ok=True)
        ablation.record_path(task).write_text(ablation.record_text(plan, task))
        args = {"fold": task.fold, "epochs": 100, "strategy": "shared", "init": "brats", "workers": 3, "resume_if_exists": False,
                "pretrain_ckpt": with_fold(task.stage.settings["pretrain_ckpt"], task.fold)}
        (ablation.record_path(task).parent / "run_args.json").write_text(json.dumps({"argv": [], "args": args}))
    assert [ablation.task_state(plan, t) for t in train] == ["complete", "complete"]  # older run_args.json: fewer keys, other workers
    run_args = ablation.record_path(train[1]).parent / "run_args.json"
    recorded = json.loads(run_args.read_text())
    recorded["args"]["pretrain_ckpt"] = with_fold(train[1].stage.settings["pretrain_ckpt"], 0)  # fine-tuned from the wrong BraTS fold
    run_args.write_text(json.dumps(recorded))
    assert [ablation.task_state(plan, t) for t in train] == ["complete", "stale"]
    assert "--pretrain-ckpt was" in ablation.plan.settings_mismatches(train[1])[0]
    run_args.unlink()  # an older output folder without a run_args.json: the plan's record decides
    assert ablation.task_state(plan, train[1]) == "complete"
    assert FOLD in train[0].stage.decl.recorded(train[0].stage.settings)[0]


@pytest.mark.slow(11)
def test_emitted_job_redoes_a_task_whose_stage_recorded_other_settings(tmp_path):
    from test_ablation import _notes, _stage, _started_argv
    settings = {"brats_dir": str(tmp_path / "brats"), "output_dir": str(tmp_path / "out"), "workers": 1}
    stage = _stage("prep", tmp_path, decl=STAGES["preprocess_brats2024_t2flair.py"], settings=settings)
    plan = ablation.Plan((stage,), tmp_path / "work", tmp_path / "grid.json")
    script = ablation.emit_slurm(plan, tmp_path / "jobs", python=sys.executable)[0]
    env = dict(os.environ, PYTHON=sys.executable)
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "--overwrite" not in _started_argv(tmp_path, "prep"), first.stderr
    assert ablation.task_state(plan, Task(stage, None)) == "complete"  # no run_args.json: the plan's record decides
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_args.json").write_text(json.dumps({"argv": [], "args": {"brats_dir": str(tmp_path / "other"), "workers": 8}}))
    assert ablation.task_state(plan, Task(stage, None)) == "stale"
    redo = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert redo.returncode == 0 and "settings changed" in redo.stdout, redo.stderr
    assert _started_argv(tmp_path, "prep")[-1] == "--overwrite" and _notes(tmp_path, "done") == ["prep", "prep"]
