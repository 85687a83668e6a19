"""`spec.runtime: vllm` (issue 14 item 1): the InferenceService on KServe's Hugging Face runtime with its vLLM
backend. It validates against the upstream InferenceService CRD with no field the schema would prune, every flag
is one vLLM's (or KServe's huggingfaceserver's) parser declares, with the value shape it declares
(tests/fixtures/vllm/cli_options.yaml, copied from their sources), and users call it at the same URLs as the
flashops runtime. Nonsense combinations are refused by `flashops validate` with the fix."""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
import yaml

import kserve
from flashops.api import spec as S
from flashops.api.crdschema import CRDValidator
from flashops.operator import children as C
from flashops.operator.config import OperatorConfig
from flashops.operator.inference import build_inference_service, predictor_args, vllm_args
from flashops.operator.render import render_objects

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "tests" / "fixtures" / "crds" / "serving.kserve.io_inferenceservices.yaml"
VLLM = yaml.safe_load((REPO / "tests" / "fixtures" / "vllm" / "cli_options.yaml").read_text())
CONFIG = OperatorConfig(s3_endpoint="http://minio:9000")
URI = "s3://flashops/models/default/chat/v1"


def deployment(name: str = "flash-vllm", **spec) -> S.ModelDeployment:
    body = {"source": URI, "runtime": "vllm", **spec}
    return S.parse_object({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment",
                           "metadata": {"name": name, "namespace": "team-a"}, "spec": body})


def pruned_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop silently (not in the structural schema): CRDValidator, like the server,
    does not call them errors, so a misspelt field would pass it unnoticed."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props, addl = schema.get("properties"), schema.get("additionalProperties")
        out = []
        for k, v in value.items():
            if path == "" and k in ("apiVersion", "kind", "metadata", "status"):
                continue  # metadata is the API server's ObjectMeta, not in the CRD schema
            if props is not None and k in props:
                out += pruned_fields(v, props[k], f"{path}.{k}")
            elif isinstance(addl, dict):
                out += pruned_fields(v, addl, f"{path}.{k}")
            else:
                out.append(f"{path}.{k}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [p for i, v in enumerate(value) for p in pruned_fields(v, schema["items"], f"{path}[{i}]")]
    return []


ISVC_SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def check_flag(arg: str, k: int) -> str:
    """One rendered argument against the parsers' declared options and value shapes; returns the option name."""
    name, eq, value = arg.partition("=")
    hf_options, engine = VLLM["huggingfaceserver_options"], VLLM["engine_options"]
    assert name in engine or name in hf_options, f"{name}: not an option of vLLM's or huggingfaceserver's parser"
    shape = {**VLLM["value_shapes"], **VLLM["huggingfaceserver_value_shapes"]}[name]
    if shape["type"] == "flag":
        assert not eq, f"{name} takes no value"
    elif shape["type"] == "int":
        assert int(value) >= shape["min"], arg
    elif shape["type"] == "choice":
        assert value in shape.get("choices", shape.get("choices_include")), arg
    elif shape["type"] == "json":
        config = json.loads(value)
        spec = VLLM["speculative_config"]
        assert set(config) <= set(spec["fields"]), config
        assert config["method"] in spec["mtp_methods"] and config["method"] == "mtp"
        assert isinstance(config["num_speculative_tokens"], int) and config["num_speculative_tokens"] == k > spec[
            "num_speculative_tokens"]["gt"]
    else:
        pytest.fail(f"no value shape for {name}")
    return name


@pytest.mark.parametrize("tensor, expert", [(1, False), (4, True), (8, True)])
@pytest.mark.parametrize("quantization", ["none", "int4"])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_every_flag_is_one_vllm_parses_with_the_value_it_declares(tensor, expert, quantization, k):
    md = deployment(parallelism={"tensor": tensor, "expert": expert}, quantization=quantization,
                    speculative={"mtpTokens": k}, maxConcurrency=16)
    args = vllm_args(md)
    names = [check_flag(a, k) for a in args]
    assert len(names) == len(set(names)), f"a flag given twice: {args}"
    # the runtime's own --model_name={{.Name}} comes first in the container; ours must not repeat it
    assert not {a.partition("=")[0] for a in VLLM["kserve_runtime"]["container_args"]} & set(names)
    values = dict(a.partition("=")[::2] for a in args)
    assert values["--backend"] == "vllm" and values["--tensor-parallel-size"] == str(tensor)
    assert values["--max-num-seqs"] == "16" and values["--dtype"] == "bfloat16"
    assert ("--enable-expert-parallel" in values) is expert
    assert values.get("--quantization") == {"none": None, "int4": "compressed-tensors"}[quantization]
    if k:
        assert json.loads(values["--speculative-config"]) == {"method": "mtp", "num_speculative_tokens": k}
    else:  # vLLM's num_speculative_tokens must be > 0: no speculation means no flag
        assert "--speculative-config" not in values


def test_the_check_above_can_fail():
    with pytest.raises(AssertionError, match="not an option"):
        check_flag("--tensor-parallel=4", 0)  # vLLM's option is --tensor-parallel-size
    with pytest.raises(AssertionError):
        check_flag("--dtype=bf16", 0)
    with pytest.raises(AssertionError):
        check_flag('--speculative-config={"method":"eagle","num_speculative_tokens":3}', 3)
    with pytest.raises(ValueError):
        check_flag("--speculative-config={method: mtp}", 3)


def test_inference_service_on_kserves_huggingface_runtime_validates_against_the_upstream_crd():
    md = deployment(parallelism={"tensor": 4, "expert": True}, quantization="int4", speculative={"mtpTokens": 3},
                    resources={"cpu": "16", "memory": "200Gi"}, replicas={"min": 0, "max": 3}, canaryTrafficPercent=10)
    isvc = build_inference_service(md, URI, CONFIG)
    assert CRDValidator.from_file(CRD).errors(isvc) == []
    assert pruned_fields(isvc, ISVC_SCHEMA) == []
    pred = isvc["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["modelFormat"]["name"] in VLLM["kserve_runtime"]["supported_model_formats"]
    assert model["runtime"] == VLLM["kserve_runtime"]["name"] == CONFIG.vllm_runtime
    assert model["storageUri"] == URI + "/int4" and "containers" not in pred  # the export's INT4 folder
    assert model["resources"]["limits"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "4"}
    assert (pred["minReplicas"], pred["maxReplicas"], pred["canaryTrafficPercent"]) == (0, 3, 10)
    assert pred["serviceAccountName"] == "flashops-serving"
    assert isvc["metadata"]["annotations"]["flashops.dev/runtime"] == "vllm"
    # the check can fail: a misspelt field is pruned, not refused, by the server
    model["storageURI"] = model.pop("storageUri")
    assert pruned_fields(isvc, ISVC_SCHEMA) == [".spec.predictor.model.storageURI"]


def test_gpus_default_to_the_tensor_degree_and_the_operator_settings_name_runtime_and_account():
    md = deployment(parallelism={"tensor": 2})
    isvc = build_inference_service(md, URI, OperatorConfig(vllm_runtime="team-vllm", serving_service_account="sa"))
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert pred["model"]["runtime"] == "team-vllm" and pred["serviceAccountName"] == "sa"
    assert build_inference_service(deployment(), URI, CONFIG)["spec"]["predictor"]["model"]["resources"] == {
        "limits": {"nvidia.com/gpu": "1"}}
    # hf:// needs no S3 account; a file:// model (a local store) cannot be downloaded by KServe
    assert "serviceAccountName" not in build_inference_service(md, "hf://org/model", CONFIG)["spec"]["predictor"]
    with pytest.raises(C.InvalidObject, match="file:///tmp/m.*s3://"):
        build_inference_service(md, "file:///tmp/m", CONFIG)


def _routes(path: Path) -> tuple[str, set[str]]:
    """(prefix, route paths) of an APIRouter(prefix=...) with add_api_route calls, read from the source."""
    tree = ast.parse(path.read_text())
    consts: dict[str, ast.expr] = {}
    for n in tree.body:  # module constants, first assignment (the default, before any normalisation)
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name):
                    consts.setdefault(t.id, n.value)
    prefix = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "APIRouter":
            kw = next(k.value for k in node.keywords if k.arg == "prefix")
            value = consts[kw.id] if isinstance(kw, ast.Name) else kw
            if isinstance(value, ast.Call):  # os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai")
                value = value.args[1]
            prefix = value.value
    paths = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "add_api_route"}
    return prefix, paths


def test_both_runtimes_answer_the_openai_routes_at_the_same_urls_under_the_same_model_name():
    """flashops runtime: serving/openai_routes.py. vllm runtime: kserve's OpenAI router (the installed kserve, the
    package KServe's huggingfaceserver serves with), model name --model_name={{.Name}} = the InferenceService's."""
    ours_prefix, ours = _routes(REPO / "serving" / "openai_routes.py")
    theirs_prefix, theirs = _routes(Path(kserve.__file__).parent / "protocol" / "rest" / "openai" / "endpoints.py")
    users_call = {"/models", "/completions", "/chat/completions"}
    assert {ours_prefix + p for p in users_call} <= {ours_prefix + p for p in ours}
    assert {ours_prefix + p for p in users_call} <= {theirs_prefix + p for p in theirs}
    md = deployment()
    flashops = md.model_copy(update={"spec": md.spec.model_copy(update={"runtime": "flashops"})})
    served_as = predictor_args(flashops, URI)[predictor_args(flashops, URI).index("--name") + 1]
    isvc_name = build_inference_service(md, URI, CONFIG)["metadata"]["name"]
    assert served_as == isvc_name == md.name
    assert VLLM["kserve_runtime"]["container_args"] == ["--model_name={{.Name}}"]


def test_render_cli_shows_the_vllm_inference_service(tmp_path):
    spec = tmp_path / "vllm.yaml"
    spec.write_text(yaml.safe_dump({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment",
                                    "metadata": {"name": "flash-vllm"},
                                    "spec": {"source": URI, "runtime": "vllm", "quantization": "int4",
                                             "parallelism": {"tensor": 8, "expert": True},
                                             "speculative": {"mtpTokens": 3}}}))
    out = subprocess.run([str(REPO / ".venv" / "bin" / "flashops"), "render", "-f", str(spec)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (isvc,) = list(yaml.safe_load_all(out.stdout))
    assert CRDValidator.from_file(CRD).errors(isvc) == [] and pruned_fields(isvc, ISVC_SCHEMA) == []
    assert '--speculative-config={"method":"mtp","num_speculative_tokens":3}' in isvc["spec"]["predictor"]["model"]["args"]


REFUSED = [
    ({"runtime": "flashops", "parallelism": {"tensor": 2}}, "parallelism applies to runtime: vllm only"),
    ({"parallelism": {"tensor": 8}, "resources": {"gpu": 4}}, "resources.gpu 4 does not match parallelism.tensor 8"),
    ({"resources": {"gpu": 2}}, "resources.gpu 2 does not match parallelism.tensor 1"),
    ({"source": "file:///home/me/models/chat/v1"}, "cannot read file:// URIs"),
    ({"storage": {"endpoint": "http://minio:9000"}}, "storage: runtime vllm"),
    ({"thinking": True}, "thinking"),
    ({"runtime": "sglang"}, "runtime"),
    ({"parallelism": {"tensor": 0}}, "parallelism.tensor"),
    ({"speculative": {"mtpTokens": "auto"}}, "mtpTokens: auto is not resolved for runtime vllm"),
]


def test_validate_refuses_nonsense_combinations_with_the_fix(tmp_path):
    """One `flashops validate` over one file per combination: exit 2, each file's problem named with its fix."""
    files = []
    for i, (spec, _) in enumerate(REFUSED):
        f = tmp_path / f"md{i}.yaml"
        f.write_text(yaml.safe_dump({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment",
                                     "metadata": {"name": f"md{i}"}, "spec": {"source": URI, "runtime": "vllm", **spec}}))
        files += ["-f", str(f)]
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "ok"},
                                  "spec": {"source": URI, "runtime": "vllm", "parallelism": {"tensor": 8, "expert": True},
                                           "resources": {"gpu": 8}}}))
    out = subprocess.run([str(REPO / ".venv" / "bin" / "flashops"), "validate", "--offline", *files, "-f", str(ok)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    text = " ".join((out.stdout + out.stderr).split())  # rich wraps long lines
    for i, (_, words) in enumerate(REFUSED):
        assert f"md{i}.yaml" in text and words in text, (i, words, text)
    assert "ok.yaml: ModelDeployment/ok: OK" in text


def test_the_crd_refuses_the_same_combinations():
    from flashops.api.crds import crd

    v = CRDValidator(crd("ModelDeployment"))
    for spec, _ in REFUSED:
        body = {"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "md"},
                "spec": {"source": URI, "runtime": "vllm", **spec}}
        assert v.errors(body), spec
    for ok in ({"parallelism": {"tensor": 4, "expert": True}, "resources": {"gpu": 4}},
               {"parallelism": {"tensor": 4}}, {}, {"runtime": "flashops", "thinking": True}):
        body = {"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "md"},
                "spec": {"source": URI, "runtime": "vllm", **ok}}
        assert v.errors(body) == [] and S.parse_object(body).spec.runtime == ok.get("runtime", "vllm")


def test_render_of_a_run_name_source_keeps_the_name_for_the_operator_to_resolve():
    md = deployment(source="rl-debug")
    (isvc,) = render_objects([md], CONFIG)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "rl-debug"


@pytest.mark.k8s
def test_operator_creates_the_vllm_inference_service_and_the_api_refuses_a_bad_combination(k8s, start_operator):
    """Through the real operator and the API emulator: no FLASHOPS_S3_ENDPOINT needed (KServe downloads the model),
    the child validates against the upstream CRD, status follows KServe's; the CRD's CEL rules refuse parallelism
    on the flashops runtime at `kubectl apply`, before the operator sees it."""
    from fixtures.k8s import ISVCS, condition, wait_state

    start_operator(s3_endpoint=None)
    doc = {"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "flash-vllm"},
           "spec": {"source": URI, "runtime": "vllm", "quantization": "int4", "speculative": {"mtpTokens": 3},
                    "parallelism": {"tensor": 8, "expert": True}}}
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    isvc = k8s.wait_for(lambda: k8s.find(*ISVCS, "flash-vllm"), message="the InferenceService")
    assert CRDValidator.from_file(CRD).errors(isvc) == [] and pruned_fields(isvc, ISVC_SCHEMA) == []
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == URI + "/int4" and model["resources"]["limits"]["nvidia.com/gpu"] == "8"
    k8s.patch(*ISVCS, "flash-vllm", {"status": {"url": "http://flash-vllm.default.example.com", "conditions": [
        {"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}}, subresource="status")
    md = wait_state(k8s, "modeldeployments", "flash-vllm", "Running")
    assert condition(md, "Ready")["status"] == "True" and md["status"]["url"].startswith("http://flash-vllm.")

    doc["metadata"]["name"], doc["spec"]["runtime"] = "flash-bad", "flashops"
    out = k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0 and "parallelism applies to runtime: vllm only" in out.stderr


def test_local_serve_of_a_vllm_spec_says_it_runs_the_flashops_runtime(tmp_path):
    spec = tmp_path / "vllm.yaml"
    spec.write_text(yaml.safe_dump({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment",
                                    "metadata": {"name": "flash-vllm"}, "spec": {"source": URI, "runtime": "vllm"}}))
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = subprocess.run([str(REPO / ".venv" / "bin" / "flashops"), "serve", "-f", str(spec), "--port", str(port),
                          "--model", f"file://{tmp_path}/no-such-model"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0  # nothing to load: the note comes first, before any model is read
    assert "runtime vllm runs on a cluster" in out.stderr and "flashops runtime" in out.stderr
