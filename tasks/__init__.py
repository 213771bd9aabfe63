"""trtflow's stages. This package must stay importable without Prefect: tasks/gpu runs under the
TensorRT interpreter (Python 3.9) and importing ``tasks.gpu`` executes this file first."""
