"""``build-engine``: the GPU part of one precision (build, eval run, benchmark), on the ``gpu`` pool.

convert-model (CPU pool) prepares everything a build needs and puts it under the bucket's work
prefix; this flow downloads it, checks the model against its own TensorRT (the target convert-model
validated for came from a worker record or a setting, this worker is the truth), holds the GPU's
build slot around the subprocess, and uploads the engine, eval outputs, logs and response beside the
inputs. Errors are written there too (error.json), so convert-model reads one place whether this
flow ran on a GPU worker or in its own process.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from flows.gpu_slot import default_gpu_id, gpu_slot
from tasks.engine import BuildInputs, engine_from_onnx, fetch_build_inputs, store_build_error, store_build_outputs
from tasks.errors import ModelError, TrtflowError
from tasks.gpu_client import GpuEnv, probe_gpu
from tasks.spec import ModelSpec
from tasks.storage import open_storage

FLOW_NAME = "build-engine"
DEPLOYMENT_SETTING = "TRTFLOW_GPU_DEPLOYMENT"  # "build-engine/build-engine" on deployments; unset: in-process


class BuildRequest(BaseModel):
    """The parameters of one build-engine run: where its work prefix is, and for what."""

    bucket_uri: str = Field(description="The bucket (storage URI) holding the work prefix.")
    work_prefix: str = Field(description="_trtflow/work/<convert-model run>/<precision>/")
    name: str = Field(description="Model name (names the run).")
    precision: str = Field(description="fp32, fp16 or int8.")


def parser_recheck(onnx_path: Path, env: GpuEnv) -> None:
    """Refuse a model this worker's ONNX parser cannot read (IR or opset newer than it knows).

    convert-model validated for a recorded or configured target; a worker with an older TensorRT
    may pick the run up, and its parser would fail with a less clear message mid-build.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    caps = env.policy()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if opset is not None and opset > caps.parser_max_opset:
        problems.append(f"ai.onnx opset {opset} (this worker's TensorRT {env.tensorrt} reads up to "
                        f"{caps.parser_max_opset})")
    if model.ir_version > caps.parser_max_ir:
        problems.append(f"IR version {model.ir_version} (up to {caps.parser_max_ir})")
    if problems:
        raise ModelError(f"the model needs a newer ONNX parser than GPU worker's TensorRT {env.tensorrt}: "
                         + "; ".join(problems) + ".",
                         fix=f"Re-export with opset_version={caps.parser_max_opset} (or onnx.version_converter), or "
                             "run the gpu pool's workers with a newer TensorRT.")


def _build(storage, inputs: BuildInputs, env: GpuEnv, workdir: Path):
    job = inputs.job
    with gpu_slot(default_gpu_id(env.gpu_uuid)):
        return engine_from_onnx(
            storage, env=env, spec=ModelSpec(**job.spec), onnx_path=inputs.onnx_path, precision=job.precision,
            profiles=job.profiles, workdir=workdir, eval_inputs=inputs.eval_inputs, int8_mode=job.int8_mode,
            graph_precision=job.graph_precision, calibration=inputs.calibration, model_url=job.model_url)


@flow(name=FLOW_NAME, flow_run_name="{request.name}-{request.precision}", log_prints=False)
def build_engine(request: BuildRequest) -> dict:
    """Build, run and time one engine from the work prefix; returns the response's key and target."""
    if isinstance(request, dict):
        request = BuildRequest(**request)
    logger = get_run_logger()
    storage = open_storage(request.bucket_uri)
    workdir = Path(tempfile.mkdtemp(prefix="trtflow-build-", dir=os.environ.get("TRTFLOW_WORKDIR") or None))
    try:
        env = probe_gpu(workdir / "probe")
        logger.info("%s %s on %s, TensorRT %s", request.name, request.precision, env.gpu, env.tensorrt)
        inputs = fetch_build_inputs(storage, request.work_prefix, workdir)
        parser_recheck(inputs.onnx_path, env)
        outcome = _build(storage, inputs, env, workdir)
        key = store_build_outputs(storage, request.work_prefix, outcome, env)
        logger.info("engine built in %.1f s (GPU subprocess)", outcome.seconds)
        for note in (outcome.response.get("engine") or {}).get("deprecations") or []:
            # The manifest records these too; the run log is where an operator sees them first.
            logger.warning("TensorRT %s deprecates a path this build used: %s", env.tensorrt, note)
        return {"response": key, "target": env.target}
    except TrtflowError as err:
        store_build_error(storage, request.work_prefix, err)
        raise
    finally:
        if not os.environ.get("TRTFLOW_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)
