"""Where one part starts another by command line, the command line the first part writes is the one the
second part parses: the operator's pod specs against the trainer's and the predictor's real parsers."""
from pathlib import Path

from flashops.api import spec as S
from flashops.operator.config import OperatorConfig
from flashops.operator.inference import build_inference_service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_predictor_args_written_by_the_operator_parse_with_the_predictor_entry_point():
    from flashops.serving.__main__ import parse_args

    for thinking in (False, True):
        md = S.load_file(EXAMPLES / "deployment.yaml")[0]
        md.spec.thinking = thinking
        isvc = build_inference_service(md, "s3://models/x/models/rl-debug/step-10", OperatorConfig(s3_endpoint="http://minio:9000"))
        container = isvc["spec"]["predictor"]["containers"][0]
        assert container["command"] == ["python", "-m", "flashops.serving"]
        args = parse_args(container["args"])
        assert args.model == "s3://models/x/models/rl-debug/step-10"
        assert args.name == md.name  # clients call the model by the deployment's name
        assert (args.quantization, args.mtp_tokens, args.thinking, args.max_concurrency) == (
            md.spec.quantization, md.spec.speculative.mtp_tokens, thinking, md.spec.max_concurrency)
        assert args.port == container["ports"][0]["containerPort"]


def test_trainer_pod_written_by_the_operator_runs_the_real_trainer(tmp_path):
    """The operator's ConfigMap + torchrun command + env, executed as the pod would (one process)."""
    import os
    import subprocess
    import sys

    import yaml

    from flashops.operator.children import build_job, spec_configmap

    run = S.parse_object(yaml.safe_load("""
apiVersion: flashops.dev/v1alpha1
kind: TrainingRun
metadata: {name: contract-sft, namespace: team-a, uid: "0b6c-1234"}
spec: {stage: sft, training: {steps: 2, batchSize: 2, seqLen: 32}, checkpoint: {every: 1, keep: 1}}
"""))
    config = OperatorConfig(checkpoint_root=f"file://{tmp_path}/store")
    cm = spec_configmap(run, config)
    job = build_job(run, 0, config)
    (spec_file_name, spec_text), = cm["data"].items()
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[0] == "torchrun" and command[-2] == "--spec" and command[-1].endswith("/" + spec_file_name)
    spec_path = tmp_path / spec_file_name
    spec_path.write_text(spec_text)
    command = [str(Path(sys.executable).parent / "torchrun"), *command[1:-1], str(spec_path)]
    env = {**os.environ, "FLASHOPS_HOME": str(tmp_path / "home"),
           **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    from flashops.storage import open_store

    latest = open_store(f"file://{tmp_path}/store/team-a").latest("contract-sft")
    assert latest is not None and latest.step == 2

    # What the operator then serves for a ModelDeployment of this run is the export the pod just wrote.
    from flashops.operator.reconcile import served_uri
    from flashops.serving.loading import ServeOptions, load_predictor

    served = served_uri(latest.uri)
    assert served == f"file://{tmp_path}/store/team-a/models/contract-sft/step-2"
    predictor = load_predictor(ServeOptions(model_uri=served, name="contract-chat", cache_dir=str(tmp_path / "cache")))
    assert predictor.name == "contract-chat"
