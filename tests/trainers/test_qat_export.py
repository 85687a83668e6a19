"""The QAT group size a run trained with is recorded in its checkpoint manifest and used by the export, so
the served INT4 model computes what QAT computed (a group size other than the model's 64 used to be lost)."""
import json

import torch

from flashops.trainers.runner import export_model, run_training


def test_qat_group_size_survives_export(home, store, tiny_run, tmp_path, exact_int4):
    from flashops.model import JoyAIFlash, get_config
    from flashops.model.qat import enable_qat
    from flashops.serving.loading import load_model
    from flashops.storage import fetch_model

    run = tiny_run("qat32", "pretrain", training={"steps": 2}, qat={"mode": "int4", "groupSize": 32})
    result = run_training(run, store, False)
    assert store.meta(result.checkpoint_uri).extra["qat_group_size"] == 32

    uri = export_model(store, None, result.checkpoint_uri, "qat32")
    served_dir = fetch_model(uri, tmp_path / "served")
    int4_config = json.loads((served_dir / "int4" / "config.json").read_text())
    assert int4_config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert store.model_manifest(uri)["meta"]["int4"]["group_size"] == 32
    served, _ = load_model(served_dir, "int4")

    qat_model = JoyAIFlash(get_config("joyai-flash-debug"))
    store.load_checkpoint(result.checkpoint_uri, {"model": qat_model.state_dict()})
    enable_qat(qat_model, 32)
    tokens = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = qat_model.eval()(tokens).logits
        got = served(tokens).logits
        # the group size matters at this tolerance: rounding with 64-wide groups gives other logits
        enable_qat(qat_model, 64)
        other = qat_model(tokens).logits
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    assert (other - want).abs().max() > 10 * (got - want).abs().max()


def test_checkpoints_export_cli_exports_an_older_checkpoint(home, store, tmp_path):
    """`flashops checkpoints export URI --name --version --int4` on a checkpoint no pipeline exported."""
    from typer.testing import CliRunner

    from flashops.cli.app import app
    from flashops.model import JoyAIFlash, get_config
    from flashops.serving.loading import load_model
    from flashops.storage import fetch_model

    cfg = get_config("joyai-flash-debug")
    model = JoyAIFlash(cfg)
    ref = store.save_checkpoint("old-run", 5, {"model": model.state_dict()}, {"model_config": cfg.to_dict()})
    runner = CliRunner()
    out = runner.invoke(app, ["checkpoints", "export", ref.uri, "--name", "old", "--version", "v1", "--int4",
                              "--max-file-size", "1MB"])
    assert out.exit_code == 0, out.output
    uri = out.stdout.strip()
    assert uri == store.model_uri("old", "v1")
    served_dir = fetch_model(uri, tmp_path / "served")
    assert len(list(served_dir.glob("model-*.safetensors"))) > 2  # --max-file-size 1MB: several files
    full, _ = load_model(served_dir, "none")
    for k, v in model.state_dict().items():
        assert torch.equal(full.state_dict()[k], v), k
    int4, _ = load_model(served_dir, "int4")  # INT4 written on request although the run had no QAT
    int4_config = json.loads((served_dir / "int4" / "config.json").read_text())
    assert int4_config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == \
        cfg.qat_group_size
    missing = runner.invoke(app, ["checkpoints", "export", ref.uri.replace("step-5", "step-6"), "--name", "x"])
    assert missing.exit_code == 1 and "step-6" in missing.output
    bad = runner.invoke(app, ["checkpoints", "export", "file:///nowhere/models/x", "--name", "x"])
    assert bad.exit_code == 2
    size = runner.invoke(app, ["checkpoints", "export", ref.uri, "--name", "x", "--max-file-size", "lots"])
    assert size.exit_code == 2 and "5GB" in size.output
