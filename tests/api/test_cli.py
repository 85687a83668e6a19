"""The `flashops` command: exit codes and output of the spec commands, through the real entry point."""
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FLASHOPS = [str(Path(sys.executable).parent / "flashops")]


def flashops(*args, cwd=ROOT):
    return subprocess.run([*FLASHOPS, *args], cwd=cwd, capture_output=True, text=True)


def test_validate_prints_one_ok_line_per_object():
    files = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    out = flashops("validate", "-f", *files)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    n_objects = sum(1 for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d)
    assert len(lines) == n_objects and all(": OK" in line for line in lines)


def test_validate_bad_stage_exits_2_with_the_message(tmp_path):
    bad = tmp_path / "quickstart.yaml"
    bad.write_text((ROOT / "examples" / "quickstart.yaml").read_text().replace("stage: sft", "stage: stf", 1))
    out = flashops("validate", "-f", str(bad))
    assert out.returncode == 2
    assert ("quickstart.yaml: TrainingPipeline/quickstart: spec.stages[1].spec.stage: "
            "'stf' is not one of pretrain, sft, dpo, rl, eval") in out.stderr


def test_validate_usage_errors_exit_2(tmp_path):
    assert flashops("validate").returncode == 2
    missing = flashops("validate", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read the file" in missing.stderr
    assert flashops("no-such-command").returncode == 2


def test_crds_command_prints_loadable_crds():
    out = flashops("crds")
    assert out.returncode == 0
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert kinds == ["TrainingRun", "TrainingPipeline", "ModelDeployment"]


def test_help_teaches_with_examples():
    out = flashops("--help")
    assert out.returncode == 0 and "flashops validate -f examples/quickstart.yaml" in out.stdout
    out = flashops("validate", "--help")
    assert "Example" in out.stdout and "flashops validate -f examples/*.yaml" in out.stdout


def test_version():
    out = flashops("version")
    assert out.returncode == 0 and out.stdout.startswith("flashops ") and "flashops.dev/v1alpha1" in out.stdout


def test_validate_checks_model_overrides_against_the_architecture(tmp_path):
    f = tmp_path / "runs.yaml"
    f.write_text(
        "apiVersion: flashops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: a}\n"
        "spec: {stage: sft, model: {overrides: {n_layer: 2}}}\n---\n"
        "apiVersion: flashops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: b}\n"
        "spec: {stage: sft, model: {overrides: {top_k: 20}}}\n")
    out = flashops("validate", "-f", str(f))
    assert out.returncode == 2
    assert "runs.yaml: TrainingRun/a: spec.model.overrides.n_layer: 2: unknown field" in out.stderr
    assert "did you mean 'n_layers'?" in out.stderr
    assert "runs.yaml: TrainingRun/b: spec.model.overrides.top_k: 20: top_k cannot exceed num_experts (8)" in out.stderr


def test_every_command_and_group_help_shows_an_example():
    import typer

    from flashops.cli.app import app

    def walk(cmd, path):
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, [*path, name])

    missing = [" ".join(p) or "flashops" for p, c in walk(typer.main.get_command(app), [])
               if not ("xample" in (c.help or "") and "flashops " in (c.help or ""))]
    assert not missing, f"--help without an example: {missing}"


def test_rl_summary_reports_each_metric_with_its_own_direction():
    """A rise in sampled reward must not read as 'better' when greedy accuracy fell."""
    from types import SimpleNamespace

    from rich.console import Console

    from flashops.cli.run_commands import _rl_comparison

    def ev(reward, greedy):
        return {"prompts": 48, "greedy_accuracy": greedy, "sampled_reward": reward, "per_domain_greedy": {}}

    console = Console(record=True, width=200)
    result = SimpleNamespace(run="rl", metrics={"eval_before": ev(0.094, 0.146), "eval_after": ev(0.125, 0.125)})
    _rl_comparison(result, console)
    text = console.export_text()
    assert "sampled reward (what RL optimises) rose (0.094 -> 0.125)" in text
    assert "greedy accuracy fell (0.146 -> 0.125)" in text


def test_validate_refuses_names_the_children_would_refuse(tmp_path):
    """Issue 17 item 3: `9lives` passed validate, then the TrainJob CRD refused the child (RFC 1035)."""
    doc = yaml.safe_load((ROOT / "examples" / "pretrain.yaml").read_text())
    doc["metadata"]["name"] = "9lives"
    bad = tmp_path / "run.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = flashops("validate", "-f", str(bad))
    assert out.returncode == 2
    assert "metadata.name: '9lives' is not a valid name" in out.stderr and "starting with a letter" in out.stderr
    assert "e.g. 'lives'" in out.stderr
